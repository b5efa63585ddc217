// DeviceMesh: sizes, the rank-order convention, and one MPI_Comm_split per group.
#include "parallel/mesh.h"

#include <sstream>

#include "parallel/mpi_communicator.h"

namespace loom {

MeshSizes resolve_mesh_sizes(const MeshSizes& requested, int world_size) {
  MeshSizes s = requested;
  LOOM_CHECK(s.cp >= 1 && s.ep >= 1 && s.dp >= 0)
      << "mesh sizes must be positive (dp may be 0 = world / (cp * ep)): dp=" << s.dp << " cp=" << s.cp
      << " ep=" << s.ep << " world=" << world_size;
  if (s.dp == 0) {
    LOOM_CHECK(world_size % (s.cp * s.ep) == 0)
        << "dp=0 needs the world size divisible by cp * ep = " << s.cp * s.ep << ": dp=0 cp=" << s.cp
        << " ep=" << s.ep << " world=" << world_size;
    s.dp = world_size / (s.cp * s.ep);
  }
  LOOM_CHECK(static_cast<int64_t>(s.dp) * s.cp * s.ep == world_size)
      << "dp * cp * ep must equal the world size: dp=" << s.dp << " cp=" << s.cp << " ep=" << s.ep
      << " (product " << static_cast<int64_t>(s.dp) * s.cp * s.ep << ") world=" << world_size;
  return s;
}

int mesh_rank(const MeshCoord& c, const MeshSizes& s) { return (c.dp * s.ep + c.ep) * s.cp + c.cp; }

MeshCoord mesh_coord(int world_rank, const MeshSizes& s) {
  MeshCoord c;
  c.cp = world_rank % s.cp;
  c.ep = (world_rank / s.cp) % s.ep;
  c.dp = world_rank / (s.cp * s.ep);
  return c;
}

const std::vector<std::string>& DeviceMesh::group_names() {
  static const std::vector<std::string> names = {"world", "dp", "cp", "ep", "dp_cp", "dp_ep", "cp_ep"};
  return names;
}

DeviceMesh::DeviceMesh(const MeshSizes& sizes, const MpiCommunicator& world)
    : sizes_(resolve_mesh_sizes(sizes, world.size())), world_rank_(world.rank()) {
  coord_ = mesh_coord(world_rank_, sizes_);
  for (const std::string& name : group_names()) {
    // A group holds the ranks that agree on every axis outside it: the color
    // encodes those coordinates; ordering by world rank gives the ranks above.
    const bool in_dp = name == "world" || name.find("dp") != std::string::npos;
    const bool in_cp = name == "world" || name.find("cp") != std::string::npos;
    const bool in_ep = name == "world" || name.find("ep") != std::string::npos;
    MeshCoord fixed{in_dp ? 0 : coord_.dp, in_cp ? 0 : coord_.cp, in_ep ? 0 : coord_.ep};
    const int color = mesh_rank(fixed, sizes_);
    groups_[name] = world.split(color, world_rank_, name);
  }
}

DeviceMesh::~DeviceMesh() = default;

Communicator& DeviceMesh::group(const std::string& name) const {
  auto it = groups_.find(name);
  if (it == groups_.end()) {
    std::ostringstream known;
    for (const std::string& n : group_names()) known << (known.tellp() > 0 ? ", " : "") << n;
    LOOM_FAIL() << "unknown mesh group '" << name << "'; known groups: " << known.str();
  }
  return *it->second;
}

}  // namespace loom
