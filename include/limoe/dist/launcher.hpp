// limoe/dist/launcher.hpp: what an MPI launcher (mpirun, mpiexec, srun with PMI) says in the environment. Needs
// no MPI: a program built without it can still tell that a launcher started several copies of it.
#pragma once

#include <algorithm>
#include <cstdlib>

namespace limoe::dist {

// The number of processes the launcher started: 0 when none started this one, 1 when it did not say how many.
inline long launcher_processes() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MPI_LOCALNRANKS"})
    if (const char* s = std::getenv(v)) return std::max(1L, std::atol(s));
  return std::getenv("PMIX_RANK") != nullptr ? 1 : 0;
}

}  // namespace limoe::dist
