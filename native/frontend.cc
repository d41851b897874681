// The native inference frontend: a grpc++ server (Debian's libgrpc++) inside the
// Python process, owning its own threads. ModelInfer requests, and ModelStreamInfer
// messages, that it can prove valid against the model's config are batched here and
// handed to Python once per batch (contiguous numpy columns, zero-copy); every other
// call -- other RPCs, requests it cannot prove valid (a stream's: one unary ModelInfer
// each), bad tokens -- is forwarded byte for byte to the Python gRPC server on a
// loopback port, which answers exactly as it does without this frontend (one source
// of truth for statuses and messages).
//
// The rules it validates with come from the Python core (hooks.spec(model)): the
// names, datatypes, dims, item sizes, max_batch_size, batching knobs. See
// services/inference/native.py and the README section "Native frontend".

#include <absl/synchronization/mutex.h>
#include <grpcpp/generic/async_generic_service.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <grpcpp/support/byte_buffer.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <random>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "cache.h"
#include "tensorwire/inference/grpc_service.pb.h"

namespace py = pybind11;
using Clock = std::chrono::steady_clock;

namespace {

const char kInferMethod[] = "/inference.GRPCInferenceService/ModelInfer";
const char kStreamMethod[] = "/inference.GRPCInferenceService/ModelStreamInfer";
const char kBearer[] = "authorization";
// Marks a stream message forwarded to Python as one unary ModelInfer (its value: the
// process's secret, tensorwire.rpc.interceptor.stream_message_token()): the Python
// interceptor then counts no ModelInfer RPC for it (the stream is counted once, as
// ModelStreamInfer) and skips the role check (the stream passed it at its start).
// Never taken from a client: ForwardedMetadata drops it.
const char kStreamTag[] = "tensorwire-stream-message";

// -- model specs (from Python) -------------------------------------------------

struct TensorSpec {
  std::string name;
  std::string datatype;
  std::vector<int64_t> dims;  // without the batch dim; -1 = any
  int64_t itemsize = 0;
};

struct Spec {
  bool eligible = false;  // false: every request of this model goes to Python
  int64_t max_batch_size = 0;
  int64_t max_queue_size = 0;
  double max_queue_delay_s = 0;
  std::vector<int64_t> preferred;
  int64_t concurrency = 1;
  int64_t max_dims = 16;
  std::vector<TensorSpec> inputs, outputs;
  // The routing table (Python's Routing): ready versions, traffic split.
  std::vector<int64_t> ready, choices;
  std::vector<double> cumulative;
  // The response cache: each version whose answers it caches (each request's key is
  // computed here; with the local cache it is also looked up here unless the version
  // skips the cache, with Redis Python looks it up); inputs' spec indexes in name
  // order (the key hashes them so).
  struct CachedVersion {
    CachedVersion(twcache::Blake2b b, std::string f) : base(std::move(b)), fingerprint(std::move(f)) {}
    twcache::Blake2b base;  // the key hasher's base
    std::string fingerprint;  // the config it was made for
    // What Python's answer to this version's last batch said (cached.skipping): while
    // hits are rare and its forward is cheap against consulting the cache, requests are
    // keyed (for the one batch in HitRate.SAMPLE_EVERY that Python consults the cache
    // for, so the rate stays current; ~1 us here against ~10 us in Python) but not
    // looked up here.
    mutable std::atomic<bool> skip{false};
  };
  std::unordered_map<std::string, CachedVersion> cache_versions;
  std::vector<int> by_name;

  // The version a request goes to: its explicit one if ready (else "" -> Python
  // says why), or one picked by the traffic split, as Routing.pick does.
  std::string Route(const std::string& version) const {
    if (!version.empty()) {
      if (version.size() > 18) return "";
      for (char c : version) if (c < '0' || c > '9') return "";
      int64_t v = std::stoll(version);
      for (int64_t r : ready) if (r == v) return std::to_string(v);
      return "";
    }
    if (choices.empty()) return "";
    thread_local std::mt19937_64 rng{std::random_device{}()};
    double x = std::uniform_real_distribution<double>(0.0, 1.0)(rng) * cumulative.back();
    size_t i = std::upper_bound(cumulative.begin(), cumulative.end(), x) - cumulative.begin();
    return std::to_string(choices[std::min(i, choices.size() - 1)]);
  }
};

bool Parse(const grpc::ByteBuffer& buffer, google::protobuf::MessageLite* message) {
  std::vector<grpc::Slice> slices;
  if (!buffer.Dump(&slices).ok()) return false;
  if (slices.size() == 1) return message->ParseFromArray(slices[0].begin(), static_cast<int>(slices[0].size()));
  std::string joined;
  joined.reserve(buffer.Length());
  for (const auto& s : slices) joined.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return message->ParseFromString(joined);
}

grpc::ByteBuffer Serialize(const google::protobuf::MessageLite& message) {
  std::string bytes = message.SerializeAsString();
  grpc::Slice slice(std::move(bytes));
  return grpc::ByteBuffer(&slice, 1);
}

// A request's response cache key (cache.py's RequestKeys.key, byte for byte): `base`
// is its version's hasher, `order` the request's input indexes in name order.
std::string RequestKey(const twcache::Blake2b& base, const inference::ModelInferRequest& r,
                       const std::vector<int>& order) {
  twcache::Blake2b h = base;
  h.U32(static_cast<uint32_t>(order.size()));
  for (int j : order) {
    const auto& in = r.inputs(j);
    h.Text(in.name());
    h.Text(in.datatype());
    h.U32(static_cast<uint32_t>(in.shape_size()));
    for (int64_t d : in.shape()) h.I64(d);
    const std::string& raw = r.raw_input_contents(j);
    h.U32(static_cast<uint32_t>(raw.size()));
    h.Update(raw.data(), raw.size());
  }
  h.U32(static_cast<uint32_t>(r.outputs_size()));
  for (const auto& out : r.outputs()) h.Text(out.name());
  return h.Digest();
}

class Frontend;

// Keeps this native thread's Python thread state for the thread's life: without it
// every GIL acquisition creates and destroys one (~30 us on this machine, per batch).
struct PinThreadState {
  PinThreadState() {
    py::gil_scoped_acquire gil;
    gil.inc_ref();
  }
  ~PinThreadState() {
    py::gil_scoped_acquire gil;
    gil.dec_ref();
  }
};

// Python's grpc.StatusCode names (the stream's error_message is "<NAME>: <message>").
std::string CodeName(grpc::StatusCode code) {
  static const char* const names[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                      "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED",
                                      "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL",
                                      "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"};
  int i = static_cast<int>(code);
  return i >= 0 && i < 17 ? names[i] : std::to_string(i);
}

// The client metadata a forwarded call carries to the Python server.
std::vector<std::pair<std::string, std::string>> ForwardedMetadata(grpc::GenericCallbackServerContext* ctx) {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& [key, value] : ctx->client_metadata()) {
    std::string k(key.data(), key.size());
    if (k.empty() || k[0] == ':' || k.rfind("grpc-", 0) == 0 || k == "user-agent" || k == "content-type" ||
        k == "te" || k == "host" || k == kStreamTag)
      continue;
    out.emplace_back(std::move(k), std::string(value.data(), value.size()));
  }
  return out;
}

// What the frontend's graveyard frees (a moment after the last use; see Call::Unref).
struct Grave {
  virtual ~Grave() = default;
};

// One ModelInfer request for the batcher: a unary call (Call), or one message of a
// ModelStreamInfer stream (StreamItem). Each is answered exactly once, by Reply, Fail
// or Fallback, and not touched by the batcher after that.
class Item : public Grave {
 public:
  explicit Item(bool streamed) : streamed(streamed) {}
  const bool streamed;
  inference::ModelInferRequest request;
  std::shared_ptr<const Spec> spec;
  std::vector<int> input_order;   // spec input i -> request input index
  std::vector<int> output_order;  // outputs to send (spec indexes)
  int64_t rows = 0;
  std::string cache_key;  // its response cache key, when its version's answers are cached
  bool looked_up = false;  // whether the local cache's entries were looked up here for it (all missed)
  Clock::time_point enqueued;
  Clock::time_point deadline = Clock::time_point::max();
  grpc::ByteBuffer first;  // the request as received (forwarded if it falls back)

  virtual bool cancelled() const = 0;
  virtual void Reply(inference::ModelInferResponse* response) = 0;  // may take the response's contents
  virtual void Fail(grpc::StatusCode code, const std::string& message) = 0;
  virtual void Fallback() = 0;  // Python serves it (it says why, or answers)
};

// -- one call: a ModelInfer served here, or any call proxied to Python ---------

class Call;

class BackendCall : public grpc::ClientBidiReactor<grpc::ByteBuffer, grpc::ByteBuffer> {
 public:
  explicit BackendCall(Call* call) : call_(call) {}
  void OnWriteDone(bool ok) override;
  void OnReadDone(bool ok) override;
  void OnDone(const grpc::Status& status) override;
  grpc::ClientContext context;
  grpc::ByteBuffer out;

 private:
  Call* call_;
};

class Call : public grpc::ServerGenericBidiReactor, public Item {
 public:
  Call(Frontend* frontend, grpc::GenericCallbackServerContext* ctx);
  ~Call() override;

  grpc::GenericCallbackServerContext* ctx() { return ctx_; }
  bool cancelled() const override { return cancelled_.load(); }
  void Reply(inference::ModelInferResponse* response) override {
    response_ = Serialize(*response);
    StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
  }
  void Fail(grpc::StatusCode code, const std::string& message) override { Finish(grpc::Status(code, message)); }
  void Fallback() override { Proxy(true); }
  // Forward this call to the Python server ("first" already read, if `have_first`).
  void Proxy(bool have_first);

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

  // Backend side.
  void BackendWriteDone(bool ok);
  void BackendReadDone(bool ok);
  void BackendDone(const grpc::Status& status);
  // After the last of the two reactors' OnDone (this call's, and its backend call's
  // when it was forwarded) the call goes to the frontend's graveyard, freed a moment
  // later: gRPC's own code still runs right after each OnDone, so neither side may
  // free the pair (the ClientContext included) from its OnDone or from the other
  // side's (that aborted the process: "pure virtual method called").
  void Unref();

 private:
  void MaybeFinish();  // with mu_ held

  Frontend* frontend_;
  grpc::GenericCallbackServerContext* ctx_;
  bool infer_;
  std::atomic<bool> proxying_{false};
  std::atomic<bool> cancelled_{false};
  grpc::ByteBuffer in_, response_;
  BackendCall* backend_ = nullptr;
  std::mutex mu_;
  bool writing_ = false, backend_done_ = false, finished_ = false;
  // The two holds on the backend stream (its read flow and its write flow are driven
  // from this call's reactions, outside the backend's own: without a hold, the backend
  // stream may complete and free itself between its status arriving and our next
  // StartRead/StartWrite on it -- a second completion, a second grpc_call_unref and
  // "pure virtual method called" when the context later unrefs the freed call).
  // Released (mu_ held) once no operation will be started on that flow again.
  bool read_hold_ = false, write_hold_ = false;
  void ReleaseReadHold();   // mu_ held
  void ReleaseWriteHold();  // mu_ held
  grpc::Status backend_status_;
  std::atomic<int> refs_{1};
  bool server_done_ = false;  // this call's OnDone ran: its context is gone (mu_)
};

// -- ModelStreamInfer, served here --------------------------------------------
//
// Python's semantics (InferenceServicer.ModelStreamInfer): each message is a
// ModelInferRequest, answered (in completion order) by a ModelStreamInferResponse
// with `infer_response`, or `error_message` "<CODE>: <message>" and the request's
// model name, version and id; a bad request does not end the stream, a message that
// does not parse does (its INVALID_ARGUMENT, from Python; nothing after it is read or
// answered, as Python's reader aborts there). At most MAX_STREAM_IN_FLIGHT (256)
// messages run at once (reading waits). The stream ends OK after the client's
// half-close once every answer is written. A stream that ends otherwise (cancelled,
// a failed write, a malformed message) is over(): its queued messages are dropped
// before their batch runs, its forwards cancelled.
//
// A message it can prove valid goes into the same per-version queue as ModelInfer;
// any other goes to Python as one unary ModelInfer call, whose status becomes the
// error_message (the words are the same: both come from the same TensorwireError).
//
// Lifetime: each message (StreamItem) holds a reference on its Stream from its
// creation to the end of its answer (Stream::Answer); the server side holds one until
// OnDone. The last reference buries the stream; an item is buried at its answer (its
// unary forward's ClientContext included): the graveyard frees both 200 ms later.
// Nothing touches the ServerContext after OnDone: the forward metadata and deadline
// are copied at the start. Writes go one at a time (a queue); Finish waits for the
// outstanding read and write.

class Stream;

class StreamItem : public Item {
 public:
  StreamItem(Frontend* frontend, Stream* stream);
  ~StreamItem() override;
  bool cancelled() const override;
  void Reply(inference::ModelInferResponse* response) override;
  void Fail(grpc::StatusCode code, const std::string& message) override;
  void Fallback() override;
  void Forwarded(const grpc::Status& status);  // the unary forward's completion

  bool parsed = false;
  std::unique_ptr<grpc::ClientContext> context;  // of the unary forward, if any
  grpc::ByteBuffer out;                          // its reply

 private:
  Frontend* frontend_;
  Stream* stream_;
};

class Stream : public grpc::ServerGenericBidiReactor, public Grave {
 public:
  Stream(Frontend* frontend, grpc::GenericCallbackServerContext* ctx);
  ~Stream() override;
  // The stream is over however it ended (the client cancelled or went away, a write
  // failed, a message that does not parse ended it): its queued messages are dropped
  // before their batch runs, its forwards cancelled, no answer of it is written.
  bool over() const { return over_.load(); }
  Clock::time_point deadline() const { return deadline_; }

  void OnReadDone(bool ok) override;
  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override;

  // One item's answer, its last touch: `bytes` to write (null: none), `end` a status
  // that ends the stream (null: none). Gives back the item's reference.
  void Answer(StreamItem* item, grpc::ByteBuffer* bytes, const grpc::Status* end);
  void Forward(StreamItem* item);  // the item to Python as a unary ModelInfer
  void Unref();

 private:
  void MaybeFinish();  // mu_ held
  void ReadMore();     // mu_ held
  void Abandon();      // mu_ held: the stream is over (see over())
  void WriteNext();    // mu_ held: start writing the front answer, if it may be

  Frontend* frontend_;
  Clock::time_point started_ = Clock::now();
  Clock::time_point deadline_ = Clock::time_point::max();
  std::chrono::system_clock::time_point wall_deadline_;
  std::vector<std::pair<std::string, std::string>> metadata_;
  grpc::ByteBuffer in_;
  std::atomic<bool> cancelled_{false}, over_{false};
  std::atomic<int> refs_{1};
  std::mutex mu_;
  std::deque<grpc::ByteBuffer> pending_;  // answers to write, the front one being written
  std::unordered_map<StreamItem*, bool> forwards_;  // unary forwards in flight
  int64_t in_flight_ = 0;
  bool reading_ = false, stalled_ = false, read_closed_ = false, writing_ = false;
  bool write_failed_ = false, failed_ = false, finished_ = false;
  // A message that did not parse is with Python for its verdict (the words of the
  // INVALID_ARGUMENT that ends the stream): meanwhile nothing more is read and no
  // answer written, as Python's reader aborts the stream at that message.
  bool judging_ = false;
  grpc::Status end_status_;
};

// -- the batcher ---------------------------------------------------------------

struct Queue {
  std::string model, version, label;
  std::shared_ptr<const Spec> spec;
  std::deque<Item*> items;
  int64_t running = 0;
  int64_t rejected = 0;  // refused (queue full) since the last report to Python
};

struct Counters {
  std::atomic<uint64_t> native{0}, proxied{0}, batches{0}, rejected{0}, fallbacks{0}, expired{0}, cancelled{0},
      streams{0}, cache_hits{0};
};

// A version's requests answered from the response cache here since Python last took
// them (Frontend::TakeCacheCounts): Python adds them to its statistics and metrics.
struct HitCounts {
  int64_t hits = 0, rows = 0, unreadable = 0, unary = 0;
  double seconds = 0;
  std::vector<double> unary_s;  // each ModelInfer hit's latency (the first kMaxLatencies)
  double overflow_s = 0;        // the sum of the others' (observed at their mean)
  static constexpr size_t kMaxLatencies = 65536;
};

class Frontend : public grpc::CallbackGenericService {
 public:
  Frontend(std::string backend, py::object hooks, int threads, bool auth, bool streams, int64_t stream_in_flight,
           std::string stream_tag)
      : hooks_(std::move(hooks)), threads_(threads), auth_(auth), streams_(streams),
        stream_in_flight_(stream_in_flight), stream_tag_(std::move(stream_tag)) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(-1);
    args.SetMaxSendMessageSize(-1);
    channel_ = grpc::CreateCustomChannel(backend, grpc::InsecureChannelCredentials(), args);
    stub_ = std::make_unique<grpc::GenericStub>(channel_);
  }

  int Start(const std::string& address, int64_t max_message_bytes, bool reuse_port) {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
    builder.SetMaxReceiveMessageSize(static_cast<int>(max_message_bytes));
    builder.SetMaxSendMessageSize(static_cast<int>(max_message_bytes));
    builder.AddChannelArgument(GRPC_ARG_ALLOW_REUSEPORT, reuse_port ? 1 : 0);
    builder.RegisterCallbackGenericService(this);
    server_ = builder.BuildAndStart();
    if (!server_ || port == 0) {
      server_.reset();
      return 0;
    }
    running_ = true;
    for (int i = 0; i < threads_; ++i) workers_.emplace_back([this] { Work(); });
    return port;
  }

  void Stop(double grace_s) {
    if (server_) {
      server_->Shutdown(std::chrono::system_clock::now() +
                        std::chrono::microseconds(static_cast<int64_t>(grace_s * 1e6)));
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      running_ = false;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
    workers_.clear();
    std::vector<Item*> left;  // what the workers did not take: answered, so Wait() returns
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [key, q] : queues_) {
        left.insert(left.end(), q->items.begin(), q->items.end());
        q->items.clear();
      }
    }
    for (Item* c : left) c->Fail(grpc::StatusCode::UNAVAILABLE, "the server is shutting down");
    if (server_) server_->Wait();
    // A forwarded call may outlive its server side by its backend call's OnDone (a
    // stream's items, by their batch or unary forward):
    // let those finish (into the graveyard) before the channel, stub and this go.
    for (int i = 0; i < 500 && live_calls_.load() > Buried(); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    std::this_thread::sleep_for(kGraveDelay);
    Reap(true);
    server_.reset();
  }

  void Invalidate() {
    std::lock_guard<std::mutex> lock(spec_mu_);
    specs_.clear();
    tokens_.clear();
    generation_++;  // a spec being built meanwhile is used once, not kept
  }

  py::dict Stats() {
    py::dict d;
    d["native"] = counters_.native.load();
    d["proxied"] = counters_.proxied.load();
    d["batches"] = counters_.batches.load();
    d["rejected"] = counters_.rejected.load();
    d["fallbacks"] = counters_.fallbacks.load();
    d["expired"] = counters_.expired.load();
    d["cancelled"] = counters_.cancelled.load();
    d["streams"] = counters_.streams.load();
    d["cache_hits"] = counters_.cache_hits.load();
    // Calls, streams and stream messages alive and not yet in the graveyard: 0 once
    // everything is answered (a reference never given back shows here).
    d["unburied"] = live_calls_.load() - Buried();
    int64_t queued = 0, running = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& [key, q] : queues_) {
        queued += q->items.size();
        running += q->running;
      }
    }
    d["queued"] = queued;
    d["running"] = running;
    return d;
  }

  // The local response cache's entries (set once, before start): requests of a
  // version whose answers it holds are looked up here, and a hit is answered at once.
  void SetCache(std::shared_ptr<twcache::LruStore> store) { cache_ = std::move(store); }

  // The hits answered here since the last call, per version: (model, version, hits,
  // rows, seconds, unreadable entries, ModelInfer calls among them, the latencies of
  // the first 65,536 of those, the others' summed).
  py::list TakeCacheCounts() {
    std::map<std::string, HitCounts> taken;
    {
      std::lock_guard<std::mutex> lock(hits_mu_);
      taken.swap(hit_counts_);
    }
    py::list out;
    for (auto& [key, h] : taken) {
      size_t cut = key.find('\0');
      py::array_t<double> latencies(std::vector<py::ssize_t>{static_cast<py::ssize_t>(h.unary_s.size())},
                                    std::vector<py::ssize_t>{sizeof(double)}, h.unary_s.data());
      out.append(py::make_tuple(key.substr(0, cut), key.substr(cut + 1), h.hits, h.rows, h.seconds, h.unreadable,
                                h.unary, latencies, h.overflow_s));
    }
    return out;
  }

  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    Reap(false);
    // A stream whose token the native side has not seen pass is forwarded whole
    // (Python's interceptor checks it once, at the start, as here).
    if (streams_ && ctx->method() == kStreamMethod && Authorized(ctx)) {
      counters_.streams++;
      return new Stream(this, ctx);
    }
    return new Call(this, ctx);
  }

  // Once per natively served stream (its end): the RPC metrics Python's interceptor
  // keeps for a stream it serves.
  void StreamDone(const std::string& code, double seconds) {
    py::gil_scoped_acquire gil;
    try {
      hooks_.attr("stream_done")(code, seconds);
    } catch (py::error_already_set&) {
    }
  }

  grpc::GenericStub* stub() { return stub_.get(); }
  int64_t stream_in_flight() const { return stream_in_flight_; }
  const std::string& stream_tag() const { return stream_tag_; }
  void CallStarted() { live_calls_.fetch_add(1, std::memory_order_relaxed); }
  void CallEnded() { live_calls_.fetch_sub(1, std::memory_order_acq_rel); }
  static constexpr auto kGraveDelay = std::chrono::milliseconds(200);
  void Bury(Grave* call) {
    std::lock_guard<std::mutex> lock(grave_mu_);
    grave_.emplace_back(Clock::now(), call);
  }
  int64_t Buried() {
    std::lock_guard<std::mutex> lock(grave_mu_);
    return static_cast<int64_t>(grave_.size());
  }
  // Frees the calls buried over kGraveDelay ago (`all`: every one).
  void Reap(bool all);
  Counters& counters() { return counters_; }

  // A ModelInfer request arrived: serve it here, or forward it.
  void Admit(Call* call) {
    if (!Authorized(call->ctx()) || !Parse(call->first, &call->request)) return call->Proxy(true);
    auto deadline = call->ctx()->deadline();
    auto now = Clock::now();
    if (deadline != std::chrono::system_clock::time_point::max()) {
      call->deadline = now + std::chrono::duration_cast<Clock::duration>(deadline - std::chrono::system_clock::now());
    }
    Enqueue(call);
  }

  // One message of a natively served stream (the stream's token passed at its start).
  void Admit(StreamItem* item, Clock::time_point deadline) {
    item->parsed = Parse(item->first, &item->request);
    if (!item->parsed) return item->Fallback();
    item->deadline = deadline;
    Enqueue(item);
  }

  // A parsed request: into its version's queue if it is certainly valid, else to Python.
  void Enqueue(Item* call) {
    auto spec = SpecOf(call->request.model_name());
    if (!spec || !spec->eligible || !Validate(call, *spec)) return call->Fallback();
    call->spec = spec;
    call->enqueued = Clock::now();
    const std::string& model = call->request.model_name();
    const std::string version = spec->Route(call->request.model_version());
    if (version.empty()) return call->Fallback();
    std::string key = model + '\0' + version;
    if (!spec->cache_versions.empty()) {
      auto cached = spec->cache_versions.find(version);
      if (cached != spec->cache_versions.end()) {
        std::vector<int> order;
        for (int i : spec->by_name) order.push_back(call->input_order[i]);
        call->cache_key = RequestKey(cached->second.base, call->request, order);
        if (cache_ && !cached->second.skip.load(std::memory_order_relaxed)) {  // the local cache: look it up now
          if (twcache::Value value = cache_->Get(call->cache_key)) {
            if (AnswerFromCache(call, *spec, key, version, *value)) return;
          }
          call->looked_up = true;
        }
      }
    }
    std::string full;
    bool wake = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto& q = queues_[key];
      if (!q) {
        q = std::make_unique<Queue>();
        q->model = model;
        q->version = version;
        q->label = model + ":" + version;
      }
      q->spec = spec;  // the newest rules for what is taken from now on
      if (static_cast<int64_t>(q->items.size()) >= spec->max_queue_size) {
        full = q->label + ": request queue is full (" + std::to_string(spec->max_queue_size) +
               " waiting); retry later";
        q->rejected++;  // reported with the queue's next batch (no GIL on this thread)
      } else {
        q->items.push_back(call);
        wake = WakeFor(*q);
      }
    }
    if (!full.empty()) {
      counters_.rejected++;
      return call->Fail(grpc::StatusCode::RESOURCE_EXHAUSTED, full);
    }
    if (wake) cv_.notify_one();
  }

 private:
  bool Authorized(grpc::GenericCallbackServerContext* ctx) {
    if (!auth_) return true;
    const auto& md = ctx->client_metadata();
    auto it = md.find(kBearer);
    if (it == md.end()) return false;  // Python says precisely what is missing
    std::string header(it->second.data(), it->second.size());
    auto now = Clock::now();
    {
      std::lock_guard<std::mutex> lock(spec_mu_);
      auto found = tokens_.find(header);
      if (found != tokens_.end() && found->second > now) return true;
    }
    bool ok = false;
    {
      py::gil_scoped_acquire gil;
      try {
        ok = hooks_.attr("authorize")(py::bytes(header)).cast<bool>();
      } catch (py::error_already_set&) {
        ok = false;
      }
    }
    if (ok) {  // a token file is re-read within a second; so is this cache
      std::lock_guard<std::mutex> lock(spec_mu_);
      if (tokens_.size() > 4096) tokens_.clear();
      tokens_[header] = now + std::chrono::seconds(1);
    }
    return ok;
  }

  std::shared_ptr<const Spec> SpecOf(const std::string& model) {
    uint64_t generation;
    {
      std::lock_guard<std::mutex> lock(spec_mu_);
      auto it = specs_.find(model);
      if (it != specs_.end()) return it->second;
      generation = generation_;
    }
    auto spec = std::make_shared<Spec>();
    {
      py::gil_scoped_acquire gil;
      try {
        py::object got = hooks_.attr("spec")(model);
        if (!got.is_none()) {
          py::dict d = got.cast<py::dict>();
          spec->eligible = true;
          spec->max_batch_size = d["max_batch_size"].cast<int64_t>();
          spec->max_queue_size = d["max_queue_size"].cast<int64_t>();
          spec->max_queue_delay_s = d["max_queue_delay_s"].cast<double>();
          spec->preferred = d["preferred_batch_sizes"].cast<std::vector<int64_t>>();
          spec->concurrency = std::max<int64_t>(1, d["max_concurrent_batches"].cast<int64_t>());
          spec->max_dims = d["max_dims"].cast<int64_t>();
          spec->ready = d["ready"].cast<std::vector<int64_t>>();
          spec->choices = d["choices"].cast<std::vector<int64_t>>();
          spec->cumulative = d["cumulative"].cast<std::vector<double>>();
          for (auto which : {"inputs", "outputs"}) {
            for (auto t : d[which]) {
              auto tup = t.cast<py::tuple>();
              TensorSpec ts{tup[0].cast<std::string>(), tup[1].cast<std::string>(),
                            tup[2].cast<std::vector<int64_t>>(), tup[3].cast<int64_t>()};
              (std::string(which) == "inputs" ? spec->inputs : spec->outputs).push_back(ts);
            }
          }
          for (size_t i = 0; i < spec->inputs.size(); ++i) spec->by_name.push_back(static_cast<int>(i));
          std::sort(spec->by_name.begin(), spec->by_name.end(),
                    [&](int a, int b) { return spec->inputs[a].name < spec->inputs[b].name; });
          if (d.contains("cache")) {  // version -> (model, version, fingerprint): RequestKeys' parts
            for (auto [version, parts] : d["cache"].cast<py::dict>()) {
              auto p = parts.cast<py::tuple>();
              spec->cache_versions.emplace(
                  std::piecewise_construct, std::forward_as_tuple(version.cast<std::string>()),
                  std::forward_as_tuple(twcache::KeyBase(p[0].cast<std::string>(), p[1].cast<std::string>(),
                                                         p[2].cast<std::string>()),
                                        p[2].cast<std::string>()));
            }
          }
        }
      } catch (py::error_already_set& e) {
        spec->eligible = false;
      }
    }
    std::lock_guard<std::mutex> lock(spec_mu_);
    if (generation != generation_) return spec;  // the rules changed while it was read: not kept
    if (specs_.size() > 4096) specs_.clear();  // unknown names must not grow it without bound
    specs_[model] = spec;
    return spec;
  }

  // Answers `call` from a cache entry of its version (queue `key`) and counts the hit;
  // false (nothing sent) when the entry does not fit the request: it then runs as a
  // miss, and its answer replaces the entry.
  bool AnswerFromCache(Item* call, const Spec& spec, const std::string& key, const std::string& version,
                       const std::string& value) {
    std::vector<twcache::CachedTensor> tensors;
    bool fits = twcache::DecodeValue(value, &tensors) && tensors.size() == call->output_order.size();
    inference::ModelInferResponse response;
    for (size_t k = 0; fits && k < tensors.size(); ++k) {
      const TensorSpec& ts = spec.outputs[call->output_order[k]];
      const twcache::CachedTensor& t = tensors[k];
      fits = t.name == ts.name && t.datatype == ts.datatype && !t.shape.empty() && t.shape[0] == call->rows;
      uint64_t bytes = ts.itemsize;
      for (int64_t d : t.shape) {
        if (!fits || d < 0 || d > (int64_t{1} << 40) || (bytes && static_cast<uint64_t>(d) > (uint64_t{1} << 52) / bytes)) {
          fits = false;
          break;
        }
        bytes *= d;
      }
      if (!fits || bytes != t.bytes) {
        fits = false;
        break;
      }
      auto* out = response.add_outputs();
      out->set_name(ts.name);
      out->set_datatype(ts.datatype);
      for (int64_t d : t.shape) out->add_shape(d);
      response.add_raw_output_contents(t.data, t.bytes);
    }
    if (!fits) {
      std::lock_guard<std::mutex> lock(hits_mu_);
      hit_counts_[key].unreadable++;
      return false;
    }
    response.set_model_name(call->request.model_name());
    response.set_model_version(version);
    response.set_id(call->request.id());
    const double seconds = std::chrono::duration<double>(Clock::now() - call->enqueued).count();
    const bool unary = !call->streamed;
    const int64_t rows = call->rows;
    call->Reply(&response);  // its last touch: the call may be gone now
    counters_.native++;
    counters_.cache_hits++;
    std::lock_guard<std::mutex> lock(hits_mu_);
    HitCounts& h = hit_counts_[key];
    h.hits++;
    h.rows += rows;
    h.seconds += seconds;
    if (unary) {
      h.unary++;
      if (h.unary_s.size() < HitCounts::kMaxLatencies) {
        h.unary_s.push_back(seconds);
      } else {
        h.overflow_s += seconds;
      }
    }
    return true;
  }

  // True when the request is certainly valid for the model; false sends it to
  // Python, which rejects it with its own message (or serves it).
  static bool Validate(Item* call, const Spec& spec) {
    const auto& r = call->request;
    const auto& version = r.model_version();
    for (char c : version) if (c < '0' || c > '9') return false;
    const int n = spec.inputs.size();
    if (r.inputs_size() != n || r.raw_input_contents_size() != n) return false;
    call->input_order.assign(n, -1);
    int64_t rows = -1;
    for (int j = 0; j < n; ++j) {
      const auto& in = r.inputs(j);
      int i = 0;
      while (i < n && spec.inputs[i].name != in.name()) ++i;
      if (i == n || call->input_order[i] != -1) return false;
      call->input_order[i] = j;
      const TensorSpec& ts = spec.inputs[i];
      if (in.datatype() != ts.datatype || in.has_contents()) return false;
      if (in.shape_size() != static_cast<int>(ts.dims.size()) + 1 || in.shape_size() > spec.max_dims) return false;
      int64_t count = 1;
      for (int d = 0; d < in.shape_size(); ++d) {
        int64_t v = in.shape(d);
        if (v < 0) return false;
        if (d > 0 && ts.dims[d - 1] != -1 && ts.dims[d - 1] != v) return false;
        if (v > (int64_t{1} << 40) || (count > 0 && v > (int64_t{1} << 40) / count)) return false;
        count *= v;
      }
      int64_t b = in.shape(0);
      if (b < 1 || b > spec.max_batch_size) return false;
      if (rows != -1 && rows != b) return false;
      rows = b;
      if (static_cast<int64_t>(r.raw_input_contents(j).size()) != count * ts.itemsize) return false;
    }
    call->rows = rows;
    call->output_order.clear();
    if (r.outputs_size() == 0) {
      for (size_t i = 0; i < spec.outputs.size(); ++i) call->output_order.push_back(i);
    } else {
      for (const auto& out : r.outputs()) {
        size_t i = 0;
        while (i < spec.outputs.size() && spec.outputs[i].name != out.name()) ++i;
        if (i == spec.outputs.size()) return false;
        call->output_order.push_back(i);
      }
    }
    return true;
  }

  // (items to cut now, 0 = wait) for one queue, mutex held.
  static int64_t Target(const Queue& q) {
    int64_t depth = q.items.size(), limit = q.spec->max_batch_size;
    if (depth >= limit) return limit;
    int64_t best = 0;
    for (int64_t p : q.spec->preferred) if (p <= limit && p > best) best = p;
    if (best && depth >= best) return best;
    return 0;
  }

  // Batch threads are woken only when one is needed (a wake-up costs both threads a
  // context switch, more than the rest of a small batch's queueing): the push gave
  // `q` its first item (a batch to cut, or its delay's timer to set) or a full or
  // preferred size, `q` may start a batch (a free slot; else the thread running its
  // batch takes the next one itself when it ends), and no woken thread is already on
  // its way. A thread that takes a batch wakes the next if more is runnable. mu_ held.
  bool WakeFor(const Queue& q) {
    if (q.running >= q.spec->concurrency || idle_ <= waking_) return false;
    if (q.items.size() != 1 && Target(q) == 0) return false;
    waking_++;
    return true;
  }

  // Whether a queue other than the one just cut, or that one still, has items and a
  // free slot (mu_ held): the thread that cut a batch then wakes another for it.
  bool MoreRunnable() const {
    if (idle_ <= waking_) return false;
    for (auto& [key, q] : queues_)
      if (!q->items.empty() && q->running < q->spec->concurrency) return true;
    return false;
  }

  void Work() {
    PinThreadState pin;
    {  // torch's thread count for this thread, as Python's inference threads set it
      py::gil_scoped_acquire gil;
      try {
        hooks_.attr("thread_started")();
      } catch (py::error_already_set&) {
      }
    }
    std::unique_lock<std::mutex> lock(mu_);
    while (true) {
      if (!running_) break;
      Queue* ready = nullptr;
      int64_t size = 0;
      auto now = Clock::now();
      auto wake = Clock::time_point::max();
      for (auto& [key, q] : queues_) {
        if (q->items.empty() || q->running >= q->spec->concurrency) continue;
        int64_t target = Target(*q);
        auto cut_at = q->items.front()->enqueued +
                      std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(q->spec->max_queue_delay_s));
        if (target == 0 && now >= cut_at) target = std::min<int64_t>(q->items.size(), q->spec->max_batch_size);
        if (target > 0) { ready = q.get(); size = target; break; }
        wake = std::min(wake, cut_at);
      }
      if (!ready) {
        idle_++;
        if (wake == Clock::time_point::max()) cv_.wait(lock);
        else cv_.wait_until(lock, wake);
        idle_--;
        // Whatever woke it (a notify, its timer, a spurious wake-up), it scans again;
        // with nobody left waiting, no notify is in flight.
        waking_ = idle_ == 0 ? 0 : std::max<int64_t>(0, waking_ - 1);
        continue;
      }
      bool by_size = Target(*ready) > 0;
      std::vector<Item*> batch, dropped;
      while (!ready->items.empty() && static_cast<int64_t>(batch.size()) < size) {
        Item* c = ready->items.front();
        ready->items.pop_front();
        (c->cancelled() || now >= c->deadline ? dropped : batch).push_back(c);
      }
      ready->running++;
      Queue* q = ready;
      int64_t rejected = q->rejected;
      q->rejected = 0;
      bool wake_next = MoreRunnable();
      if (wake_next) waking_++;
      lock.unlock();
      if (wake_next) cv_.notify_one();
      if (!dropped.empty() || rejected) Dropped(*q, dropped, rejected);
      if (!batch.empty()) Run(*q, batch, by_size);
      lock.lock();
      q->running--;  // this thread scans again at once: it takes q's next batch itself
    }
  }

  // Requests dropped from a queue before their batch ran: answered (a stream's: not
  // at all) and counted where the Python batcher counts its own (dropped_cancelled,
  // dropped_expired of the version's batcher: one GIL acquisition per such cut), with
  // those the full queue refused since the last report (its `rejected`).
  void Dropped(const Queue& q, const std::vector<Item*>& dropped, int64_t rejected) {
    int64_t cancelled = 0, expired = 0;
    for (Item* c : dropped) {
      if (c->cancelled()) {
        cancelled++;
        counters_.cancelled++;
        c->Fail(grpc::StatusCode::CANCELLED, "cancelled while queued");
      } else {
        expired++;
        counters_.expired++;
        c->Fail(grpc::StatusCode::DEADLINE_EXCEEDED, q.label + ": deadline passed while queued");
      }
    }
    py::gil_scoped_acquire gil;
    try {
      hooks_.attr("dropped")(q.model, q.version, cancelled, expired, rejected);
    } catch (py::error_already_set&) {
    }
  }

  // One batch: contiguous columns -> Python once (one GIL acquisition) -> responses
  // split and encoded here. (Measured: running a lone request on the gRPC thread that
  // read it, or freeing the slot before the replies are encoded, halves the batches
  // at c=16/64 -- the requests that gather meanwhile make the next batch -- for no
  // c=1 gain beyond noise; see the README.)
  void Run(const Queue& q, const std::vector<Item*>& batch, bool by_size) {
    const std::shared_ptr<const Spec> rules = batch.front()->spec;  // items may go once answered
    const Spec& spec = *rules;
    for (Item* c : batch) {
      if (c->spec.get() != &spec) {  // the rules changed between two of its requests
        for (Item* f : batch) f->Fallback();
        counters_.fallbacks += batch.size();
        return;
      }
    }
    const size_t n_in = spec.inputs.size();
    int64_t total_rows = 0;
    for (Item* c : batch) total_rows += c->rows;
    auto start = Clock::now();
    std::vector<double> waits(batch.size());
    for (size_t k = 0; k < batch.size(); ++k)
      waits[k] = std::chrono::duration<double>(start - batch[k]->enqueued).count();

    std::string version;
    std::vector<std::string> out_bytes;  // the output columns, copied out with the GIL held
    std::vector<std::vector<int64_t>> out_shape;
    bool ok = false;
    {
      py::gil_scoped_acquire gil;
      try {
        py::list columns;
        for (size_t i = 0; i < n_in; ++i) {
          const TensorSpec& ts = spec.inputs[i];
          std::vector<py::ssize_t> shape{total_rows};
          // dims of the first request (all equal unless a -1 dim varies: then Python
          // is asked to serve them one by one below)
          const auto& first_in = batch.front()->request.inputs(batch.front()->input_order[i]);
          for (int d = 1; d < first_in.shape_size(); ++d) {
            shape.push_back(first_in.shape(d));
          }
          for (Item* c : batch) {
            const auto& in = c->request.inputs(c->input_order[i]);
            for (int d = 1; d < in.shape_size(); ++d)
              if (in.shape(d) != first_in.shape(d)) throw std::runtime_error("ragged");
          }
          std::vector<py::ssize_t> strides(shape.size(), ts.itemsize);  // C order
          for (int d = static_cast<int>(shape.size()) - 2; d >= 0; --d) strides[d] = strides[d + 1] * shape[d + 1];
          py::array column(py::reinterpret_borrow<py::dtype>(hooks_.attr("numpy_dtype")(ts.datatype)), shape, strides);
          char* dst = static_cast<char*>(column.mutable_data());
          {
            py::gil_scoped_release nogil;
            for (Item* c : batch) {
              const std::string& raw = c->request.raw_input_contents(c->input_order[i]);
              std::memcpy(dst, raw.data(), raw.size());
              dst += raw.size();
            }
          }
          columns.append(column);
        }
        // Shape and strides spelled out: with Debian's pybind11 the (count, pointer)
        // constructor handed Python the first wait repeated (the queue times were wrong).
        py::array_t<double> wait_array(std::vector<py::ssize_t>{static_cast<py::ssize_t>(waits.size())},
                                       std::vector<py::ssize_t>{sizeof(double)}, waits.data());
        // Each request's rows and, when any named some, the outputs each asked for
        // (the response cache keys on them).
        py::list rows;
        py::object named = py::none(), unary = py::none();
        for (Item* c : batch) {
          rows.append(c->rows);
          if (c->request.outputs_size() > 0) named = py::list();
          if (c->streamed) unary = py::list();
        }
        if (!unary.is_none()) {  // stream messages: no ModelInfer RPC metrics for those
          py::list flags = py::reinterpret_borrow<py::list>(unary);
          for (Item* c : batch) flags.append(!c->streamed);
        }
        if (!named.is_none()) {
          py::list lists = py::reinterpret_borrow<py::list>(named);
          for (Item* c : batch) {
            py::tuple names(c->request.outputs_size());
            for (int o = 0; o < c->request.outputs_size(); ++o) names[o] = py::str(c->request.outputs(o).name());
            lists.append(names);
          }
        }
        // The requests' response cache keys, if it computed them; with the local cache
        // it also looked them all up (all missed) unless their version skipped the cache
        // (a batch across a change of that: none counts as looked up), with Redis Python
        // does. (With the fingerprint of the config they were computed for: Python drops
        // keys of a version reloaded meanwhile.)
        py::object keys = py::none(), fingerprint = py::none();
        bool hits_pending = false;  // hits answered here not yet collected (counted before these misses)
        const bool looked_up = std::all_of(batch.begin(), batch.end(), [](const Item* c) { return c->looked_up; });
        auto cached = spec.cache_versions.find(q.version);
        if (!batch.front()->cache_key.empty()) {
          py::list list;
          for (Item* c : batch) list.append(py::bytes(c->cache_key));
          keys = list;
          if (cached != spec.cache_versions.end()) fingerprint = py::str(cached->second.fingerprint);
          if (looked_up) {
            std::lock_guard<std::mutex> lock(hits_mu_);
            hits_pending = !hit_counts_.empty();
          }
        }
        py::tuple result = hooks_.attr("run_batch")(q.model, q.version, columns, wait_array, by_size, rows, named,
                                                    unary, keys, hits_pending, looked_up, fingerprint);
        version = result[0].cast<std::string>();
        if (cached != spec.cache_versions.end())
          cached->second.skip.store(result[2].cast<bool>(), std::memory_order_relaxed);
        for (auto o : result[1].cast<py::list>()) {
          py::array a = py::reinterpret_borrow<py::array>(o);
          if (!(a.flags() & py::array::c_style) || a.ndim() < 1 || a.shape(0) != total_rows)
            throw std::runtime_error("output not contiguous or not one row per input row");
          if (out_bytes.size() == spec.outputs.size()) throw std::runtime_error("more outputs than the config's");
          out_shape.emplace_back(a.shape(), a.shape() + a.ndim());
          // The size from the config's item size: Debian's pybind11 2.10 reads a NumPy 2
          // descriptor's itemsize from the wrong place (so no a.nbytes()/a.itemsize()).
          int64_t bytes = spec.outputs[out_bytes.size()].itemsize;
          for (auto d : out_shape.back()) bytes *= d;
          out_bytes.emplace_back(static_cast<const char*>(a.data()), bytes);
        }
        ok = out_bytes.size() == spec.outputs.size();
      } catch (std::exception&) {
        ok = false;  // py::error_already_set included: Python serves each one instead
      }
    }
    if (!ok) {
      counters_.fallbacks += batch.size();
      for (Item* c : batch) c->Fallback();
      return;
    }
    counters_.batches++;
    counters_.native += batch.size();
    int64_t offset = 0;
    for (Item* c : batch) {
      inference::ModelInferResponse response;
      response.set_model_name(c->request.model_name());
      response.set_model_version(version);
      response.set_id(c->request.id());
      for (int i : c->output_order) {
        const TensorSpec& ts = spec.outputs[i];
        const auto& shape = out_shape[i];
        int64_t row_bytes = ts.itemsize;
        for (size_t d = 1; d < shape.size(); ++d) row_bytes *= shape[d];
        auto* out = response.add_outputs();
        out->set_name(ts.name);
        out->set_datatype(ts.datatype);
        out->add_shape(c->rows);
        for (size_t d = 1; d < shape.size(); ++d) out->add_shape(shape[d]);
        response.add_raw_output_contents(out_bytes[i].data() + offset * row_bytes, c->rows * row_bytes);
      }
      offset += c->rows;
      c->Reply(&response);
    }
  }

  py::object hooks_;
  int threads_;
  bool auth_, streams_;
  int64_t stream_in_flight_;  // messages of one stream running at once (Python's MAX_STREAM_IN_FLIGHT)
  std::string stream_tag_;    // kStreamTag's value ("": not sent)
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<grpc::GenericStub> stub_;
  std::unique_ptr<grpc::Server> server_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool running_ = false;
  int64_t idle_ = 0;    // batch threads waiting on cv_ (mu_)
  int64_t waking_ = 0;  // of those, notified and not yet scanning (mu_; see WakeFor)
  std::map<std::string, std::unique_ptr<Queue>> queues_;
  std::atomic<int64_t> live_calls_{0};  // Call objects not yet deleted
  std::mutex grave_mu_;
  std::deque<std::pair<Clock::time_point, Grave*>> grave_;  // done, to be freed
  std::mutex spec_mu_;
  std::unordered_map<std::string, std::shared_ptr<const Spec>> specs_;
  std::unordered_map<std::string, Clock::time_point> tokens_;
  uint64_t generation_ = 0;  // Invalidate() calls so far (spec_mu_)
  Counters counters_;
  std::shared_ptr<twcache::LruStore> cache_;  // the local response cache's entries (null: none here)
  std::mutex hits_mu_;
  std::map<std::string, HitCounts> hit_counts_;  // by queue key (model \0 version)
};

// -- Call ---------------------------------------------------------------------

void Call::Unref() {
  if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) frontend_->Bury(this);
}

void Frontend::Reap(bool all) {
  std::vector<Grave*> dead;
  {
    std::lock_guard<std::mutex> lock(grave_mu_);
    auto now = Clock::now();
    while (!grave_.empty() && (all || now - grave_.front().first >= kGraveDelay)) {
      dead.push_back(grave_.front().second);
      grave_.pop_front();
    }
  }
  for (Grave* c : dead) delete c;
}

Call::~Call() {
  delete backend_;
  frontend_->CallEnded();
}

Call::Call(Frontend* frontend, grpc::GenericCallbackServerContext* ctx)
    : Item(false), frontend_(frontend), ctx_(ctx), infer_(ctx->method() == kInferMethod) {
  frontend_->CallStarted();
  if (infer_) {
    StartRead(&first);
  } else {
    Proxy(false);
  }
}

void Call::Proxy(bool have_first) {
  frontend_->counters().proxied++;
  refs_.fetch_add(1, std::memory_order_relaxed);  // the backend call's OnDone gives it back
  auto* backend = new BackendCall(this);
  auto& context = backend->context;
  for (const auto& [key, value] : ForwardedMetadata(ctx_)) context.AddMetadata(key, value);
  context.set_deadline(ctx_->deadline());
  frontend_->stub()->PrepareBidiStreamingCall(&context, ctx_->method(), grpc::StubOptions(), backend);
  {
    std::lock_guard<std::mutex> lock(mu_);
    backend_ = backend;
    proxying_ = true;
    read_hold_ = write_hold_ = true;
  }
  backend->AddMultipleHolds(2);  // before StartCall: the read flow and the write flow
  if (have_first) backend->StartWrite(&first);
  backend->StartRead(&backend->out);
  if (cancelled_) context.TryCancel();  // the client left while this was being set up
  if (!have_first) StartRead(&in_);  // the client's messages wait (backlogged) for StartCall
  // Last: from here the whole exchange may complete on other threads and this call be
  // buried and freed (a batch thread descheduled past the grave delay): touch nothing.
  backend->StartCall();
}

void Call::ReleaseReadHold() {
  if (!read_hold_) return;
  read_hold_ = false;
  backend_->RemoveHold();  // OnDone, if it follows, is scheduled (never run inline here)
}

void Call::ReleaseWriteHold() {
  if (!write_hold_) return;
  write_hold_ = false;
  backend_->RemoveHold();
}

void Call::OnReadDone(bool ok) {
  if (infer_ && !proxying_) {
    if (!ok) {  // no request message: Python's server answers that case
      Proxy(false);
      return;
    }
    frontend_->Admit(this);
    return;
  }
  std::lock_guard<std::mutex> lock(mu_);
  if (!write_hold_) return;  // the backend stream is over: nothing more goes to it
  if (ok) {
    backend_->StartWrite(&in_);
  } else {
    backend_->StartWritesDone();
    ReleaseWriteHold();
  }
}

void Call::BackendWriteDone(bool ok) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!ok) return ReleaseWriteHold();  // the backend takes no more writes
  if (write_hold_ && !finished_ && !server_done_) StartRead(&in_);
}

void Call::BackendReadDone(bool ok) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!ok) {  // the backend's status is in (or the call failed): both flows are over
    ReleaseReadHold();
    ReleaseWriteHold();
    return;
  }
  writing_ = true;
  StartWrite(&backend_->out);
}

void Call::OnWriteDone(bool ok) {
  if (!proxying_) return;  // the native reply (StartWriteAndFinish)
  std::lock_guard<std::mutex> lock(mu_);
  writing_ = false;
  if (backend_done_) {
    MaybeFinish();
  } else if (ok) {
    backend_->StartRead(&backend_->out);  // the read hold is still ours: no read has failed
  } else {  // the client is gone: end the backend call, read nothing more from it
    backend_->context.TryCancel();
    ReleaseReadHold();
    ReleaseWriteHold();
  }
}

void Call::BackendDone(const grpc::Status& status) {
  std::lock_guard<std::mutex> lock(mu_);
  backend_done_ = true;
  backend_status_ = status;
  if (server_done_) return;  // the client went away: nothing to answer
  for (const auto& [key, value] : backend_->context.GetServerTrailingMetadata()) {
    std::string k(key.data(), key.size());
    if (k.rfind("grpc-", 0) == 0) continue;
    ctx_->AddTrailingMetadata(k, std::string(value.data(), value.size()));
  }
  MaybeFinish();
}

void Call::MaybeFinish() {
  if (writing_ || finished_) return;
  finished_ = true;
  Finish(backend_status_);
}

void Call::OnCancel() {
  cancelled_ = true;
  std::lock_guard<std::mutex> lock(mu_);
  if (backend_ && !backend_done_) backend_->context.TryCancel();
}

void Call::OnDone() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    server_done_ = true;
  }
  Unref();
}

void BackendCall::OnWriteDone(bool ok) { call_->BackendWriteDone(ok); }
void BackendCall::OnReadDone(bool ok) { call_->BackendReadDone(ok); }
void BackendCall::OnDone(const grpc::Status& status) {
  Call* call = call_;
  call->BackendDone(status);
  call->Unref();  // may bury the call (and this backend call with it): nothing after it
}

// -- Stream -------------------------------------------------------------------

StreamItem::StreamItem(Frontend* frontend, Stream* stream) : Item(true), frontend_(frontend), stream_(stream) {
  frontend_->CallStarted();
}

StreamItem::~StreamItem() { frontend_->CallEnded(); }

bool StreamItem::cancelled() const { return stream_->over(); }

void StreamItem::Reply(inference::ModelInferResponse* response) {
  inference::ModelStreamInferResponse answer;
  answer.mutable_infer_response()->Swap(response);
  grpc::ByteBuffer bytes = Serialize(answer);
  stream_->Answer(this, &bytes, nullptr);
}

void StreamItem::Fail(grpc::StatusCode code, const std::string& message) {
  // Cancelled, or past the stream's deadline: the stream is over, nothing to say. A
  // DEADLINE_EXCEEDED of this message alone (Python's: a lazy model's load took too
  // long) is answered, as the servicer answers it.
  if (code == grpc::StatusCode::CANCELLED || stream_->over() ||
      (code == grpc::StatusCode::DEADLINE_EXCEEDED && Clock::now() >= stream_->deadline()))
    return stream_->Answer(this, nullptr, nullptr);
  inference::ModelStreamInferResponse answer;  // as the servicer words a TensorwireError
  answer.set_error_message(CodeName(code) + ": " + message);
  auto* echo = answer.mutable_infer_response();
  echo->set_model_name(request.model_name());
  echo->set_model_version(request.model_version());
  echo->set_id(request.id());
  grpc::ByteBuffer bytes = Serialize(answer);
  stream_->Answer(this, &bytes, nullptr);
}

void StreamItem::Fallback() { stream_->Forward(this); }

void StreamItem::Forwarded(const grpc::Status& status) {
  if (status.ok()) {  // the ModelInferResponse's bytes, as field 2 of a ModelStreamInferResponse
    std::vector<grpc::Slice> slices;
    std::string bytes;
    if (out.Dump(&slices).ok()) {
      size_t n = out.Length();
      bytes.push_back('\x12');
      for (; n >= 0x80; n >>= 7) bytes.push_back(static_cast<char>((n & 0x7f) | 0x80));
      bytes.push_back(static_cast<char>(n));
      for (const auto& slice : slices) bytes.append(reinterpret_cast<const char*>(slice.begin()), slice.size());
    }
    grpc::Slice slice(std::move(bytes));
    grpc::ByteBuffer answer(&slice, 1);
    return stream_->Answer(this, &answer, nullptr);
  }
  if (!parsed) return stream_->Answer(this, nullptr, &status);  // Python's malformed-message abort
  // An unexpected error in Python's stream handler ends that message's task with no answer.
  if (status.error_code() == grpc::StatusCode::INTERNAL && status.error_message().rfind("internal error in ", 0) == 0)
    return stream_->Answer(this, nullptr, nullptr);
  Fail(status.error_code(), status.error_message());
}

Stream::Stream(Frontend* frontend, grpc::GenericCallbackServerContext* ctx)
    : frontend_(frontend), wall_deadline_(ctx->deadline()), metadata_(ForwardedMetadata(ctx)) {
  frontend_->CallStarted();
  if (wall_deadline_ != std::chrono::system_clock::time_point::max()) {
    deadline_ = started_ + std::chrono::duration_cast<Clock::duration>(wall_deadline_ - std::chrono::system_clock::now());
  }
  std::lock_guard<std::mutex> lock(mu_);
  reading_ = true;
  StartRead(&in_);
}

Stream::~Stream() { frontend_->CallEnded(); }

void Stream::Unref() {
  if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) frontend_->Bury(this);
}

void Stream::ReadMore() {
  if (reading_ || read_closed_ || finished_ || over_) return;
  if (judging_ || in_flight_ >= frontend_->stream_in_flight()) {
    stalled_ = true;  // the next answer (or the verdict) starts the read
    return;
  }
  stalled_ = false;
  reading_ = true;
  StartRead(&in_);
}

void Stream::WriteNext() {
  if (writing_ || pending_.empty() || judging_ || over_ || finished_) return;
  writing_ = true;
  StartWrite(&pending_.front());
}

void Stream::Abandon() {
  if (over_) return;
  over_ = true;  // the queued messages see it when their batch is cut
  for (auto& [item, _] : forwards_) item->context->TryCancel();  // answered (and dropped) soon
}

void Stream::OnReadDone(bool ok) {
  StreamItem* item = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    reading_ = false;
    if (!ok) read_closed_ = true;  // the client's half-close (or it is gone)
    if (!ok || over_ || finished_) return MaybeFinish();
    item = new StreamItem(frontend_, this);
    refs_.fetch_add(1, std::memory_order_relaxed);  // given back by Answer
    in_flight_++;
    item->first = std::move(in_);
    in_.Clear();
  }
  frontend_->Reap(false);
  frontend_->Admit(item, deadline_);  // may answer it at once (Answer takes mu_)
  std::lock_guard<std::mutex> lock(mu_);
  ReadMore();
}

void Stream::Forward(StreamItem* item) {
  frontend_->counters().proxied++;
  static const std::string method = kInferMethod;  // grpc keeps a pointer to the name
  item->context = std::make_unique<grpc::ClientContext>();
  for (const auto& [key, value] : metadata_) item->context->AddMetadata(key, value);
  if (!frontend_->stream_tag().empty()) item->context->AddMetadata(kStreamTag, frontend_->stream_tag());
  if (wall_deadline_ != std::chrono::system_clock::time_point::max()) item->context->set_deadline(wall_deadline_);
  bool cancel;
  {
    std::lock_guard<std::mutex> lock(mu_);
    forwards_[item] = true;
    // A message that does not parse: Python's verdict ends the stream (its words), so
    // nothing after it is read or written meanwhile (ReadMore, WriteNext wait for it).
    // Set before the forward starts, so before OnReadDone's next ReadMore.
    if (!item->parsed) judging_ = true;
    cancel = over_;  // Abandon cancels the forwards it finds; this one it may miss
  }
  // A ClientContext cancelled before its call starts cancels the call when it starts.
  if (cancel) item->context->TryCancel();
  auto* stub = frontend_->stub();
  // The last touch: once started, the call may complete, answer the item and give
  // back the stream's last reference at once (from a batch thread nothing else holds
  // one), so neither this stream nor the item may be touched after it.
  stub->UnaryCall(item->context.get(), method, grpc::StubOptions(), &item->first, &item->out,
                  [item](grpc::Status status) { item->Forwarded(status); });
}

void Stream::Answer(StreamItem* item, grpc::ByteBuffer* bytes, const grpc::Status* end) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    forwards_.erase(item);
    in_flight_--;
    if (!item->parsed) judging_ = false;  // the verdict (reading stopped at that message: the only one)
    if (end && !failed_) {
      failed_ = true;
      end_status_ = *end;
      Abandon();
    }
    if (bytes && !finished_ && !over_) pending_.push_back(std::move(*bytes));
    WriteNext();
    if (stalled_) ReadMore();
    MaybeFinish();
  }
  frontend_->Bury(item);
  Unref();  // may bury this stream: nothing after it
}

void Stream::OnWriteDone(bool ok) {
  std::lock_guard<std::mutex> lock(mu_);
  writing_ = false;
  pending_.pop_front();
  if (!ok) {  // the client is gone: nothing more is written, the queued messages are dropped
    write_failed_ = true;
    pending_.clear();
    Abandon();
  } else {
    WriteNext();
  }
  MaybeFinish();
}

void Stream::MaybeFinish() {
  // Finish waits for the outstanding write, and read (but a message that did not parse
  // ends the stream at once, as Python's abort does: the read then fails).
  if (finished_ || writing_ || (reading_ && !failed_)) return;
  bool over = failed_ || cancelled_ || write_failed_;
  if (!over && !(read_closed_ && in_flight_ == 0 && pending_.empty())) return;
  finished_ = true;
  pending_.clear();
  // Items still running keep their reference; their answers are dropped.
  if (failed_) Finish(end_status_);
  else if (cancelled_ || write_failed_) Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
  else Finish(grpc::Status::OK);
}

void Stream::OnCancel() {
  std::lock_guard<std::mutex> lock(mu_);
  cancelled_ = true;
  Abandon();
  MaybeFinish();
}

void Stream::OnDone() {
  std::string code;
  {
    std::lock_guard<std::mutex> lock(mu_);
    code = failed_ ? CodeName(end_status_.error_code()) : (cancelled_ || write_failed_) ? "CANCELLED" : "OK";
  }
  frontend_->StreamDone(code, std::chrono::duration<double>(Clock::now() - started_).count());
  Unref();
}

// -- the bare native echo (the benchmark's ceiling) ---------------------------

class Echo : public grpc::CallbackGenericService {
 public:
  class Reactor : public grpc::ServerGenericBidiReactor {
   public:
    explicit Reactor(const std::string& method) : method_(method) { StartRead(&in_); }
    void OnReadDone(bool ok) override {
      if (!ok) return Finish(grpc::Status::OK);
      if (method_ == kInferMethod) {
        inference::ModelInferRequest request;
        inference::ModelInferResponse response;
        if (Parse(in_, &request)) {
          response.set_model_name(request.model_name());
          response.set_id(request.id());
          for (int i = 0; i < request.inputs_size(); ++i) {
            auto* out = response.add_outputs();
            out->set_name(request.inputs(i).name());
            out->set_datatype(request.inputs(i).datatype());
            *out->mutable_shape() = request.inputs(i).shape();
          }
          *response.mutable_raw_output_contents() = request.raw_input_contents();
        }
        out_ = Serialize(response);
      } else if (method_ == "/inference.GRPCInferenceService/ModelMetadata") {
        // What perf_analyzer asks before it sends load: an echo "model" of FP32 [-1, 2].
        inference::ModelMetadataResponse response;
        response.set_name("spiral");
        response.add_versions("1");
        response.set_platform("pytorch_libtorch");
        for (auto* t : {response.add_inputs(), response.add_outputs()}) {
          t->set_name("points");
          t->set_datatype("FP32");
          t->add_shape(-1);
          t->add_shape(2);
        }
        out_ = Serialize(response);
      } else if (method_ == "/inference.GRPCInferenceService/ModelConfig") {
        inference::ModelConfigResponse response;
        auto* config = response.mutable_config();
        config->set_name("spiral");
        config->set_platform("pytorch_libtorch");
        config->set_max_batch_size(64);
        auto* in = config->add_input();
        in->set_name("points");
        in->set_data_type(inference::TYPE_FP32);
        in->add_dims(2);
        auto* out = config->add_output();
        out->set_name("points");
        out->set_data_type(inference::TYPE_FP32);
        out->add_dims(2);
        out_ = Serialize(response);
      } else if (method_ == "/inference.GRPCInferenceService/ServerMetadata") {
        inference::ServerMetadataResponse response;
        response.set_name("native echo");
        response.set_version("0");
        out_ = Serialize(response);
      } else {
        return Finish(grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "the native echo does not serve " + method_));
      }
      StartWriteAndFinish(&out_, grpc::WriteOptions(), grpc::Status::OK);
    }
    void OnDone() override { delete this; }

   private:
    std::string method_;
    grpc::ByteBuffer in_, out_;
  };
  grpc::ServerGenericBidiReactor* CreateReactor(grpc::GenericCallbackServerContext* ctx) override {
    return new Reactor(ctx->method());
  }
  int Start(const std::string& address) {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort(address, grpc::InsecureServerCredentials(), &port);
    builder.RegisterCallbackGenericService(this);
    server_ = builder.BuildAndStart();
    return server_ ? port : 0;
  }
  void Stop() {
    if (server_) {
      server_->Shutdown(std::chrono::system_clock::now());
      server_->Wait();
      server_.reset();
    }
  }

 private:
  std::unique_ptr<grpc::Server> server_;
};

// The in-process shape's hand-off: from a thread of our own, take the GIL and call
// Python, `n` times; mean nanoseconds per call (bench_frontend_shapes.py).
double HandoffNs(py::object fn, int n) {
  double ns = 0;
  {
    py::gil_scoped_release nogil;
    std::thread t([&] {
      PinThreadState pin;
      auto start = Clock::now();
      for (int i = 0; i < n; ++i) {
        py::gil_scoped_acquire gil;
        fn();
      }
      ns = std::chrono::duration<double, std::nano>(Clock::now() - start).count() / n;
    });
    t.join();
  }
  return ns;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "tensorwire's native inference frontend (grpc++ from Debian); see native/frontend.cc";
  // Debian builds abseil without NDEBUG, so every absl::Mutex that gRPC locks or
  // destroys updated a global lock-order graph (abseil's debug-only deadlock detector:
  // GraphCycles::GetId/InsertEdge/RemoveNode, ~3 % of the frontend's CPU under load).
  // Only the libraries this extension loads use that abseil (grpcio's is its own).
  absl::SetMutexDeadlockDetectionMode(absl::OnDeadlockCycle::kIgnore);
  m.attr("GRPC_VERSION") = grpc::Version();
  py::class_<Frontend>(m, "Frontend")
      .def(py::init<std::string, py::object, int, bool, bool, int64_t, std::string>(), py::arg("backend"),
           py::arg("hooks"), py::arg("threads"), py::arg("auth"), py::arg("streams"), py::arg("stream_in_flight"),
           py::arg("stream_tag") = std::string())
      .def("start", &Frontend::Start, py::arg("address"), py::arg("max_message_bytes"), py::arg("reuse_port"),
           py::call_guard<py::gil_scoped_release>())
      .def("stop", &Frontend::Stop, py::arg("grace_s"), py::call_guard<py::gil_scoped_release>())
      .def("invalidate", &Frontend::Invalidate)
      .def("stats", &Frontend::Stats)
      .def("set_cache", &Frontend::SetCache, py::arg("store"))
      .def("take_cache_counts", &Frontend::TakeCacheCounts);
  py::class_<twcache::LruStore, std::shared_ptr<twcache::LruStore>>(m, "LruStore")
      .def(py::init<int64_t, int64_t>(), py::arg("size_bytes"), py::arg("overhead"))
      .def("get_many",
           [](twcache::LruStore& store, const std::vector<std::string>& keys) {
             py::list out;
             for (const auto& key : keys) {
               twcache::Value value = store.Get(key);
               out.append(value ? py::object(py::bytes(*value)) : py::object(py::none()));
             }
             return out;
           })
      .def("put_many",
           [](twcache::LruStore& store, std::vector<std::pair<std::string, std::string>> items, int64_t max_entry) {
             auto added = store.PutMany(items, max_entry);
             return py::make_tuple(added.inserted, added.inserted_bytes, added.evicted, added.too_large);
           })
      .def_property_readonly("held_bytes", &twcache::LruStore::held_bytes)
      .def_property_readonly("entries", &twcache::LruStore::entries);
  // The key the frontend computes for a request (tests hold it to cache.py's):
  // inputs as (name, datatype, shape, raw bytes), in the request's order.
  m.def("request_key", [](const std::string& model, const std::string& version, const std::string& fingerprint,
                          const std::vector<std::tuple<std::string, std::string, std::vector<int64_t>, std::string>>& inputs,
                          const std::vector<std::string>& outputs) {
    inference::ModelInferRequest r;
    std::vector<int> order;
    for (const auto& [name, datatype, shape, raw] : inputs) {
      auto* in = r.add_inputs();
      in->set_name(name);
      in->set_datatype(datatype);
      for (int64_t d : shape) in->add_shape(d);
      r.add_raw_input_contents(raw);
      order.push_back(static_cast<int>(order.size()));
    }
    std::sort(order.begin(), order.end(), [&](int a, int b) { return r.inputs(a).name() < r.inputs(b).name(); });
    for (const auto& name : outputs) r.add_outputs()->set_name(name);
    return py::bytes(RequestKey(twcache::KeyBase(model, version, fingerprint), r, order));
  });
  m.def("handoff_ns", &HandoffNs, py::arg("fn"), py::arg("n"));
  py::class_<Echo>(m, "Echo")
      .def(py::init<>())
      .def("start", &Echo::Start, py::call_guard<py::gil_scoped_release>())
      .def("stop", &Echo::Stop, py::call_guard<py::gil_scoped_release>());
}
