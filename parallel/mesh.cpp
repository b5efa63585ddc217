// DeviceMesh: sizes, the rank-order convention, one MPI_Comm_split per group,
// the per-rank device choice, and (CUDA meshes) groups that route CUDA tensors
// to NCCL and CPU tensors to MPI.
#include "parallel/mesh.h"

#include <sstream>

#include "framework/cuda_runtime.h"
#include "framework/storage.h"
#include "parallel/mpi_check.h"
#include "parallel/mpi_communicator.h"
#ifdef LOOM_WITH_NCCL
#include "parallel/cuda/nccl_communicator.h"
#endif

namespace loom {

namespace {

// One mesh group on a CUDA rank: CUDA tensors through NCCL (created on the
// first CUDA call: NCCL setup is collective over the group, and every rank of
// a group issues its collectives in the same order, so they all create it at
// the same call), CPU tensors through the group's MPI communicator.
class DeviceRoutedCommunicator : public Communicator {
 public:
  DeviceRoutedCommunicator(MpiCommunicator& mpi, Device device) : mpi_(mpi), device_(device) {}

  int rank() const override { return mpi_.rank(); }
  int size() const override { return mpi_.size(); }
  const std::string& name() const override { return mpi_.name(); }

  void all_reduce(Tensor& t, ReduceOp op, Stream& s) override { on(t).all_reduce(t, op, s); }
  void all_gather(Tensor& out, const Tensor& in, Stream& s) override { on(in).all_gather(out, in, s); }
  void reduce_scatter(Tensor& out, const Tensor& in, ReduceOp op, Stream& s) override {
    on(in).reduce_scatter(out, in, op, s);
  }
  void broadcast(Tensor& t, int root, Stream& s) override { on(t).broadcast(t, root, s); }
  void send(const Tensor& t, int dst, Stream& s) override { on(t).send(t, dst, s); }
  void recv(Tensor& t, int src, Stream& s) override { on(t).recv(t, src, s); }
  void send_recv(const Tensor& send_tensor, int dst, Tensor& recv_tensor, int src, Stream& s) override {
    on(send_tensor).send_recv(send_tensor, dst, recv_tensor, src, s);
  }
  void all_to_all(Tensor& out, const Tensor& in, Stream& s) override { on(in).all_to_all(out, in, s); }
  void barrier() override {
    if (nccl_) nccl_->barrier();
    else mpi_.barrier();
  }
  std::unique_ptr<Work> all_reduce_async(Tensor& t, ReduceOp op, Stream& s) override {
    return on(t).all_reduce_async(t, op, s);
  }
  void all_to_all_v(Tensor& out, const std::vector<int64_t>& out_splits, const Tensor& in,
                    const std::vector<int64_t>& in_splits, Stream& s) override {
    on(in).all_to_all_v(out, out_splits, in, in_splits, s);
  }

 private:
  Communicator& on(const Tensor& t) {
    if (!t.defined() || t.device().is_cpu()) return mpi_;
    LOOM_CHECK(t.device() == device_) << "group '" << name() << "' of a mesh on " << device_
                                      << " got a tensor on " << t.device();
#ifdef LOOM_WITH_NCCL
    if (!nccl_) nccl_ = std::make_unique<NcclCommunicator>(mpi_, device_);
    return *nccl_;
#else
    LOOM_FAIL() << "group '" << name() << "': a CUDA tensor needs NCCL, and loom was built without it";
#endif
  }

  MpiCommunicator& mpi_;
  Device device_;
  std::unique_ptr<Communicator> nccl_;
};

}  // namespace

int node_local_rank(const MpiCommunicator& world) {
  MPI_Comm node = MPI_COMM_NULL;
  LOOM_MPI_CHECK(MPI_Comm_split_type(world.comm(), MPI_COMM_TYPE_SHARED, world.rank(), MPI_INFO_NULL, &node));
  int local = 0;
  MPI_Comm_rank(node, &local);
  MPI_Comm_free(&node);
  return local;
}

Device select_device(const std::string& setting, const MpiCommunicator& world) {
  if (setting == "cpu") return Device::cpu();
  LOOM_CHECK(setting == "cuda" || setting.rfind("cuda:", 0) == 0)
      << "device \"" << setting << "\" is not one of cpu, cuda, cuda:N";
  const int local = setting == "cuda" ? node_local_rank(world) : 0;  // collective: every rank calls it
  const int count = cuda_device_count();
  LOOM_CHECK(count > 0) << "device \"" << setting << "\" on rank " << world.rank()
                        << ": no usable GPU (" << cuda_unavailable_reason() << ")";
  Device device = setting == "cuda" ? Device::cuda(local % count) : Device::parse(setting);
  LOOM_CHECK(device.index >= 0 && device.index < count)
      << "device \"" << setting << "\" on rank " << world.rank() << ": only " << count << " GPU(s) present";
  cuda_rt::set_current_device(device.index);  // NCCL and cuBLAS handles use the current device
  return device;
}

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

DeviceMesh::DeviceMesh(const MeshSizes& sizes, const MpiCommunicator& world, Device device)
    : sizes_(resolve_mesh_sizes(sizes, world.size())), world_rank_(world.rank()), device_(device) {
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
    if (device_.is_cuda()) routed_[name] = std::make_unique<DeviceRoutedCommunicator>(*groups_[name], device_);
  }
}

DeviceMesh::~DeviceMesh() = default;

Communicator& DeviceMesh::group(const std::string& name) const {
  if (auto routed = routed_.find(name); routed != routed_.end()) return *routed->second;
  auto it = groups_.find(name);
  if (it == groups_.end()) {
    std::ostringstream known;
    for (const std::string& n : group_names()) known << (known.tellp() > 0 ? ", " : "") << n;
    LOOM_FAIL() << "unknown mesh group '" << name << "'; known groups: " << known.str();
  }
  return *it->second;
}

}  // namespace loom
