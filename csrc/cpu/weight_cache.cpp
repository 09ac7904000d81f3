#include "cpu/weight_cache.h"

#include <c10/core/StorageImpl.h>
#include <torch/library.h>
#include <c10/util/intrusive_ptr.h>

#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <vector>

namespace fused_resnet::cpu {
namespace {

// ResNet-152 has 155 convs; keep one model's worth at two input shapes.
constexpr size_t kMaxEntries = 512;

struct Entry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  const void* data;
  int64_t version;
  c10::ScalarType dtype;
  std::vector<int64_t> key;  // storage offset, sizes, strides, input sizes, stride, padding, dilation, groups
  PackedWeight packed;

  bool alive() const { return !storage.expired(); }
};

struct Cache {
  std::mutex mutex;
  std::list<Entry> entries;  // most recently used first
  std::list<c10::weak_intrusive_ptr<c10::StorageImpl>> allowed;  // storages declared stable
};

// With the cache's mutex held: whether `storage` was declared stable; forgets freed storages on the way.
bool allowed_locked(Cache& c, const c10::StorageImpl* storage) {
  bool found = false;
  for (auto it = c.allowed.begin(); it != c.allowed.end();) {
    if (it->expired()) {
      it = c.allowed.erase(it);
      continue;
    }
    found = found || it->_unsafe_get_target() == storage;
    ++it;
  }
  return found;
}

Cache& cache() {
  static Cache* instance = new Cache();  // never destroyed: tensors must not be freed after torch unloads
  return *instance;
}

bool cache_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("FUSED_RESNET_CPU_WEIGHT_CACHE");
    return value == nullptr || !(std::strcmp(value, "0") == 0 || std::strcmp(value, "false") == 0);
  }();
  return enabled;
}

std::vector<int64_t> make_key(const at::Tensor& weight, c10::IntArrayRef input_sizes, c10::IntArrayRef stride,
                              c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  std::vector<int64_t> key;
  key.push_back(weight.storage_offset());
  for (auto list : {weight.sizes(), weight.strides(), input_sizes, stride, padding, dilation}) {
    key.push_back(static_cast<int64_t>(list.size()));
    key.insert(key.end(), list.begin(), list.end());
  }
  key.push_back(groups);
  return key;
}

}  // namespace

PackedWeight cached_prepacked_weight(const at::Tensor& weight, c10::IntArrayRef input_sizes, c10::IntArrayRef stride,
                                     c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                                     const std::function<PackedWeight()>& pack) {
  // Inference tensors have no version counter, so a change to them could not be seen: never cache them.
  if (!cache_enabled() || weight.is_inference() || weight.requires_grad() || !weight.has_storage()) {
    return pack();
  }
  const c10::StorageImpl* storage = weight.storage().unsafeGetStorageImpl();
  const void* data = weight.storage().data();
  const int64_t version = static_cast<int64_t>(weight._version());
  std::vector<int64_t> key = make_key(weight, input_sizes, stride, padding, dilation, groups);

  Cache& c = cache();
  std::unique_lock<std::mutex> lock(c.mutex);
  if (!allowed_locked(c, storage)) {
    lock.unlock();
    return pack();
  }
  for (auto it = c.entries.begin(); it != c.entries.end();) {
    if (!it->alive()) {  // the weight was freed: drop its packed copy
      it = c.entries.erase(it);
      continue;
    }
    // While the weak reference lives, no other storage can have this StorageImpl's address.
    if (it->storage._unsafe_get_target() == storage && it->data == data && it->dtype == weight.scalar_type() &&
        it->key == key) {
      if (it->version == version) {
        c.entries.splice(c.entries.begin(), c.entries, it);
        return it->packed;
      }
      it = c.entries.erase(it);  // modified in place since it was packed
      continue;
    }
    ++it;
  }
  PackedWeight packed = pack();
  c.entries.push_front(Entry{weight.storage().getWeakStorageImpl(), data, version, weight.scalar_type(),
                             std::move(key), packed});
  while (c.entries.size() > kMaxEntries) {
    c.entries.pop_back();
  }
  return packed;
}

void allow_prepacking(const at::Tensor& weight) {
  if (!weight.has_storage()) return;
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  if (!allowed_locked(c, weight.storage().unsafeGetStorageImpl())) {
    c.allowed.push_back(weight.storage().getWeakStorageImpl());
  }
}

void clear_weight_cache() {
  Cache& c = cache();
  std::list<Entry> dropped;
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    dropped.swap(c.entries);
  }
}

int64_t weight_cache_size() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return static_cast<int64_t>(c.entries.size());
}

}  // namespace fused_resnet::cpu

TORCH_LIBRARY_IMPL(fused_resnet_C, CPU, m) {
  m.impl("allow_prepacking", &fused_resnet::cpu::allow_prepacking);
}
