// DeviceMesh: the ranks of a run arranged as a dp x ep x cp grid, built once at
// start-up, holding one communicator per axis and per product of axes.
//
// Rank order (the one convention every layer relies on):
//   cp varies fastest, then ep, then dp:
//     world_rank = (dp_idx * ep + ep_idx) * cp + cp_idx
//   so the ranks of one cp group are contiguous (they share a node when cp
//   divides the ranks per node: sequence parallelism, the heaviest traffic,
//   stays on the fastest links), then ep, and dp (the least frequent traffic,
//   one gradient reduction per step) crosses nodes.
//
// Groups (communicators; every rank is in exactly one group of each name):
//   "world"                      all ranks, rank = world rank
//   "dp", "cp", "ep"             ranks differing only in that coordinate; rank = that coordinate
//   "dp_cp", "dp_ep", "cp_ep"    ranks differing only in those coordinates; rank = the
//                                rank among them in world order (dp_cp: dp_idx * cp + cp_idx)
// All groups are created in the constructor (collective over the world);
// group() only looks them up. Group communicators inherit the world
// communicator's options (e.g. MpiCommunicatorOptions::check_consistency).
//
// Backends: a mesh built for a CUDA device hands out groups that route each
// call by the tensors' device: CUDA tensors go through NCCL (one NCCL
// communicator per group, bootstrapped through the group's MPI communicator
// on the group's first CUDA collective), CPU tensors through MPI. A CPU mesh
// hands out the MPI communicators themselves.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "parallel/communicator.h"

namespace loom {

class MpiCommunicator;

struct MeshSizes {
  int dp = 0;  // 0: world / (cp * ep)
  int cp = 1;
  int ep = 1;
};

struct MeshCoord {
  int dp = 0;
  int cp = 0;
  int ep = 0;
};

// Resolves dp = 0 and checks every size is positive and dp * cp * ep == world_size
// (the error names all four numbers).
MeshSizes resolve_mesh_sizes(const MeshSizes& requested, int world_size);
// The rank-order convention above, both ways (sizes must be resolved).
int mesh_rank(const MeshCoord& coord, const MeshSizes& sizes);
MeshCoord mesh_coord(int world_rank, const MeshSizes& sizes);

// This rank's index among the ranks of its node (MPI_Comm_split_type SHARED;
// collective over `world`).
int node_local_rank(const MpiCommunicator& world);

// The device of this rank for a device setting: "cpu"; "cuda" = GPU (node-local
// rank mod GPUs on the node), so ranks of one node spread over its GPUs;
// "cuda:N" = GPU N. CUDA choices are checked against the GPUs present (the
// error names the count and why none is usable) and made current for libraries
// that use the current device. Collective over `world` for "cuda".
Device select_device(const std::string& setting, const MpiCommunicator& world);

class DeviceMesh {
 public:
  // Collective over `world`; `sizes` may leave dp = 0. `device`: where this
  // rank computes (CUDA: groups route CUDA tensors to NCCL, see above).
  DeviceMesh(const MeshSizes& sizes, const MpiCommunicator& world, Device device = Device::cpu());
  ~DeviceMesh();
  DeviceMesh(const DeviceMesh&) = delete;
  DeviceMesh& operator=(const DeviceMesh&) = delete;

  const MeshSizes& sizes() const { return sizes_; }   // resolved
  Device device() const { return device_; }
  const MeshCoord& coord() const { return coord_; }   // this rank's coordinates
  int world_rank() const { return world_rank_; }
  int world_size() const { return sizes_.dp * sizes_.cp * sizes_.ep; }

  // The group called `name` (see above); an unknown name is an error listing the known ones.
  Communicator& group(const std::string& name) const;
  // "world", "dp", "cp", "ep", "dp_cp", "dp_ep", "cp_ep".
  static const std::vector<std::string>& group_names();

 private:
  MeshSizes sizes_;
  MeshCoord coord_;
  int world_rank_ = 0;
  Device device_;
  std::map<std::string, std::unique_ptr<MpiCommunicator>> groups_;
  std::map<std::string, std::unique_ptr<Communicator>> routed_;  // CUDA meshes: device-routing groups
};

}  // namespace loom
