// A team of threads for one recurrence call: the whole time loop runs inside one parallel region
// and the threads meet at a barrier between the phases of each step (each step needs the whole
// h_{t-1}).  OpenMP (torch's own intra-op runtime in the wheels) provides both, and its barrier
// cannot hang: every thread of a team reaches it by construction.  The team may be smaller than
// asked for (nested parallelism, OMP_DYNAMIC); callers partition work by the size they get.
#pragma once

namespace fusedrnn {
namespace cpu {

// Runs fn(ctx, thread_id, team_size) on every thread of a team of at most `threads` threads
// (fn runs inline when threads <= 1).  fn must not throw.
void run_team(int threads, void (*fn)(void* ctx, int tid, int nt), void* ctx);

// Barrier of the team of the enclosing run_team call (no-op outside one, or in a team of 1).
void team_barrier();

template <typename F>
inline void run_team(int threads, F& body) {
  run_team(
      threads, [](void* ctx, int tid, int nt) { (*static_cast<F*>(ctx))(tid, nt); }, &body);
}

}  // namespace cpu
}  // namespace fusedrnn
