// OpenMP team for the CPU recurrences (see parallel.h).  Built with -fopenmp (setup.py, CMake);
// without it everything runs on the calling thread.
#include "parallel.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace fusedrnn {
namespace cpu {

namespace {
// Size of the team this thread is running for inside run_team (1 outside): team_barrier must only
// synchronise our own team, never a caller's enclosing parallel region.
thread_local int tl_team_size = 1;
}  // namespace

void run_team(int threads, void (*fn)(void* ctx, int tid, int nt), void* ctx) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const int nt = omp_get_num_threads();
      const int saved = tl_team_size;
      tl_team_size = nt;
      fn(ctx, omp_get_thread_num(), nt);
      tl_team_size = saved;
    }
    return;
  }
#endif
  fn(ctx, 0, 1);
}

void team_barrier() {
#ifdef _OPENMP
  if (tl_team_size > 1) {
    // Orphaned barrier: binds to the innermost enclosing parallel region, the one run_team opened.
#pragma omp barrier
  }
#endif
}

}  // namespace cpu
}  // namespace fusedrnn
