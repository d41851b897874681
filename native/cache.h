// The response cache's native half: the local cache's entries (an LRU bounded in
// bytes), the request keys and the decoding of entries, so that a natively served
// request that hits is answered on the gRPC thread that read it, with no Python.
//
// The formats are tensorwire/serving/cache.py's, byte for byte (one cache for both
// frontends): keys are RequestKeys' BLAKE2b-128 digests, values encode_tensors'
// layout. tests/unit/tensorwire/serving/test_cache.py holds both sides to it.

#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace twcache {

// -- BLAKE2b (RFC 7693), unkeyed, with a digest size and a personalization ------------

class Blake2b {
 public:
  Blake2b(size_t digest_bytes, const std::string& person) : out_(digest_bytes) {
    uint8_t param[64] = {0};
    param[0] = static_cast<uint8_t>(digest_bytes);
    param[2] = 1;  // fanout
    param[3] = 1;  // depth
    std::memcpy(param + 48, person.data(), std::min<size_t>(person.size(), 16));
    for (int i = 0; i < 8; ++i) h_[i] = kIV[i] ^ Load64(param + 8 * i);
  }

  void Update(const void* data, size_t n) {
    auto* in = static_cast<const uint8_t*>(data);
    while (n > 0) {
      if (fill_ == 128) {  // a full block is compressed only once more input follows
        Count(128);
        Compress(buf_, false);
        fill_ = 0;
      }
      size_t take = std::min(n, 128 - fill_);
      std::memcpy(buf_ + fill_, in, take);
      fill_ += take;
      in += take;
      n -= take;
    }
  }

  void U32(uint32_t v) {
    uint8_t b[4] = {uint8_t(v), uint8_t(v >> 8), uint8_t(v >> 16), uint8_t(v >> 24)};
    Update(b, 4);
  }
  void I64(int64_t value) {
    uint64_t v = static_cast<uint64_t>(value);
    uint8_t b[8];
    for (int i = 0; i < 8; ++i) b[i] = uint8_t(v >> (8 * i));
    Update(b, 8);
  }
  void Text(const std::string& s) {  // length-prefixed, as cache.py's _text/_prefixed
    U32(static_cast<uint32_t>(s.size()));
    Update(s.data(), s.size());
  }

  // The digest of everything so far (this hasher is left as it was).
  std::string Digest() const {
    Blake2b last = *this;
    last.Count(last.fill_);
    std::memset(last.buf_ + last.fill_, 0, 128 - last.fill_);
    last.Compress(last.buf_, true);
    std::string out(out_, '\0');
    for (size_t i = 0; i < out_; ++i) out[i] = static_cast<char>(last.h_[i / 8] >> (8 * (i % 8)));
    return out;
  }

 private:
  static constexpr uint64_t kIV[8] = {0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL,
                                      0xa54ff53a5f1d36f1ULL, 0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
                                      0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};
  static constexpr uint8_t kSigma[10][16] = {
      {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
      {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
      {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
      {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
      {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0}};

  static uint64_t Load64(const uint8_t* p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
    return v;
  }
  static uint64_t Rotr(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

  void Count(size_t n) {
    t_[0] += n;
    if (t_[0] < n) t_[1]++;
  }

  void Compress(const uint8_t* block, bool last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; ++i) m[i] = Load64(block + 8 * i);
    for (int i = 0; i < 8; ++i) {
      v[i] = h_[i];
      v[i + 8] = kIV[i];
    }
    v[12] ^= t_[0];
    v[13] ^= t_[1];
    if (last) v[14] = ~v[14];
    auto g = [&v](int a, int b, int c, int d, uint64_t x, uint64_t y) {
      v[a] = v[a] + v[b] + x;
      v[d] = Rotr(v[d] ^ v[a], 32);
      v[c] = v[c] + v[d];
      v[b] = Rotr(v[b] ^ v[c], 24);
      v[a] = v[a] + v[b] + y;
      v[d] = Rotr(v[d] ^ v[a], 16);
      v[c] = v[c] + v[d];
      v[b] = Rotr(v[b] ^ v[c], 63);
    };
    for (int r = 0; r < 12; ++r) {
      const uint8_t* s = kSigma[r % 10];
      g(0, 4, 8, 12, m[s[0]], m[s[1]]);
      g(1, 5, 9, 13, m[s[2]], m[s[3]]);
      g(2, 6, 10, 14, m[s[4]], m[s[5]]);
      g(3, 7, 11, 15, m[s[6]], m[s[7]]);
      g(0, 5, 10, 15, m[s[8]], m[s[9]]);
      g(1, 6, 11, 12, m[s[10]], m[s[11]]);
      g(2, 7, 8, 13, m[s[12]], m[s[13]]);
      g(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; ++i) h_[i] ^= v[i] ^ v[i + 8];
  }

  uint64_t h_[8];
  uint64_t t_[2] = {0, 0};
  uint8_t buf_[128];
  size_t fill_ = 0;
  size_t out_;
};

// The hasher of one model version's keys: RequestKeys' base (the model's name, the
// resolved version, the config's fingerprint), to be copied for each request.
inline Blake2b KeyBase(const std::string& model, const std::string& version, const std::string& fingerprint) {
  Blake2b h(16, "tw-response-v1");
  h.Text(model);
  h.Text(version);
  h.Text(fingerprint);
  return h;
}

// -- the local cache's entries --------------------------------------------------------

using Value = std::shared_ptr<const std::string>;

// A byte-bounded LRU (cache.py's LocalCache keeps its bookkeeping: bounds, statistics):
// each entry costs its key's and value's bytes plus `overhead`. One mutex; a lookup
// holds it for a hash-map access and a list splice, a value is shared, never copied.
class LruStore {
 public:
  LruStore(int64_t size_bytes, int64_t overhead) : size_(size_bytes), overhead_(overhead) {}

  Value Get(const std::string& key) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = index_.find(key);
    if (it == index_.end()) return nullptr;
    order_.splice(order_.begin(), order_, it->second);
    return it->second->second;
  }

  struct Added {
    int64_t inserted = 0, inserted_bytes = 0, evicted = 0, too_large = 0;
  };

  // Each (key, value), newest first at the end; an entry over `max_entry` bytes, or
  // that could never fit, is not stored.
  Added PutMany(std::vector<std::pair<std::string, std::string>>& items, int64_t max_entry) {
    Added added;
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& [key, value] : items) {
      int64_t cost = Cost(key, value.size());
      if (static_cast<int64_t>(value.size()) > max_entry || cost > size_) {
        added.too_large++;
        continue;
      }
      auto it = index_.find(key);
      if (it != index_.end()) {
        held_ -= Cost(key, it->second->second->size());
        order_.erase(it->second);
        index_.erase(it);
      }
      while (held_ + cost > size_ && !order_.empty()) {
        auto& oldest = order_.back();
        held_ -= Cost(oldest.first, oldest.second->size());
        index_.erase(oldest.first);
        order_.pop_back();
        added.evicted++;
      }
      added.inserted++;
      added.inserted_bytes += static_cast<int64_t>(value.size());
      order_.emplace_front(key, std::make_shared<const std::string>(std::move(value)));
      index_[key] = order_.begin();
      held_ += cost;
    }
    return added;
  }

  int64_t held_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return held_;
  }
  int64_t entries() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(index_.size());
  }

 private:
  int64_t Cost(const std::string& key, size_t value_bytes) const {
    return static_cast<int64_t>(key.size() + value_bytes) + overhead_;
  }

  std::mutex mu_;
  const int64_t size_, overhead_;
  int64_t held_ = 0;
  std::list<std::pair<std::string, Value>> order_;  // most recently used first
  std::unordered_map<std::string, std::list<std::pair<std::string, Value>>::iterator> index_;
};

// -- values: encode_tensors' layout ---------------------------------------------------

struct CachedTensor {
  std::string name, datatype;
  std::vector<int64_t> shape;
  const char* data = nullptr;
  uint64_t bytes = 0;
};

// The tensors of a value (pointing into it); false when it is not a value this
// server wrote (format, truncation, bytes left over).
inline bool DecodeValue(const std::string& value, std::vector<CachedTensor>* out) {
  const auto* p = reinterpret_cast<const uint8_t*>(value.data());
  const size_t n = value.size();
  size_t at = 0;
  auto has = [&](size_t k) { return k <= n - at; };
  auto u = [&](int width) {
    uint64_t v = 0;
    for (int i = width - 1; i >= 0; --i) v = (v << 8) | p[at + i];
    at += width;
    return v;
  };
  if (!has(3) || p[0] != 1) return false;  // cache.py's _FORMAT
  at = 1;
  uint64_t count = u(2);
  out->clear();
  for (uint64_t k = 0; k < count; ++k) {
    if (!has(12)) return false;
    CachedTensor t;
    uint64_t name_len = u(2), dt_len = u(1), ndim = u(1);
    t.bytes = u(8);
    if (!has(name_len + dt_len + 8 * ndim)) return false;
    t.name.assign(value, at, name_len);
    at += name_len;
    t.datatype.assign(value, at, dt_len);
    at += dt_len;
    for (uint64_t d = 0; d < ndim; ++d) t.shape.push_back(static_cast<int64_t>(u(8)));
    if (t.bytes > n - at) return false;
    t.data = value.data() + at;
    at += t.bytes;
    out->push_back(std::move(t));
  }
  return at == n;
}

}  // namespace twcache
