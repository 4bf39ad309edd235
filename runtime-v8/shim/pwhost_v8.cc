// pwhost's V8 shim: the C ABI of pwhost_v8.h over V8's C++ API (V8 10.2 as Node 18's libnode
// ships it).
//
// Design, in short:
// * One process-wide platform. With libnode (PWHOST_V8_NODE_PLATFORM), Node's
//   MultiIsolatePlatform, since libnode does not export V8's NewDefaultPlatform: each isolate is
//   registered with its own IsolatePlatformDelegate, whose foreground task queue this shim drains
//   itself between calls. With a plain V8 build, V8's default platform, whose per-isolate queues
//   are drained with v8::platform::PumpMessageLoop at the same points.
// * One isolate (and one context) per instance. Compiled code is not per isolate: a module is
//   compiled once into a CompiledWasmModule (a NativeModule of the process-wide wasm engine) and
//   every instance imports it with WasmModuleObject::FromCompiledModule.
// * Instances may move between threads, so every entry from the host takes a v8::Locker, and
//   sets the stack limit again whenever the isolate runs on a thread it did not run on last time.
//   A top-level Locker re-initialises the thread's state on entry and frees it on exit (handle
//   blocks included, so every call would allocate); so the first call from a thread leaves that
//   thread inside an Unlocker (see ParkThread), after which every Locker on it only restores the
//   thread's archived state and archives it again, lazily. That is V8's documented "Locker inside
//   an Unlocker" path, and it halves the cost of a call. Its price: V8 never frees a parked
//   thread's archived state (under 1 KiB for the last thread, a few KiB with its handle blocks
//   for others), so only the first kMaxParkedThreads threads that call an instance are parked,
//   and the thread deleting an instance, when parked, is unparked first (UnparkThread), which
//   frees its state: an instance made, called and deleted on one thread leaves nothing behind.
// * No C++ exception crosses the C ABI, and none reaches V8 from the host function callback.

#include "pwhost_v8.h"

#include <pthread.h>
#include <time.h>
#include <v8.h>

#ifndef PWHOST_V8_NODE_PLATFORM
#define PWHOST_V8_NODE_PLATFORM 1
#endif
#if PWHOST_V8_NODE_PLATFORM
#include <node.h>
#else
#include <libplatform/libplatform.h>
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace {

constexpr uint32_t kMaxArgs = 16;
/// The most guest stack one thread gives an isolate (V8's own default is 984 KiB).
constexpr uintptr_t kStackBudget = 1024 * 1024;
/// Stack kept free below the guest's limit for host functions and V8's runtime.
constexpr uintptr_t kStackMargin = 256 * 1024;
/// How many threads an instance parks (see ParkThread); calls from other threads take the
/// slower top-level Locker path.
constexpr size_t kMaxParkedThreads = 2;
/// The JS heap an instance may use. Wasm linear memory is not on it: only tables, wrappers and
/// the BigInts of i64 values are.
constexpr size_t kMaxHeapBytes = 512u * 1024 * 1024;

#if PWHOST_V8_NODE_PLATFORM
node::MultiIsolatePlatform* g_platform = nullptr;
#else
v8::Platform* g_platform = nullptr;
#endif
v8::ArrayBuffer::Allocator* g_allocator = nullptr;

pwv8_text Text(const char* data, size_t len) {
  pwv8_text text{nullptr, 0};
  if (len == 0) return text;
  char* copy = static_cast<char*>(std::malloc(len));
  if (copy == nullptr) return text;
  std::memcpy(copy, data, len);
  text.ptr = copy;
  text.len = len;
  return text;
}

void SetMessage(pwv8_text* message, const std::string& text) {
  if (message != nullptr) *message = Text(text.data(), text.size());
}

/// Reports the C++ exception being handled.
int32_t CaughtException(pwv8_text* message) {
  try {
    throw;
  } catch (const std::bad_alloc&) {
    SetMessage(message, "out of memory in the V8 shim");
  } catch (const std::exception& e) {
    SetMessage(message, std::string("C++ exception in the V8 shim: ") + e.what());
  } catch (...) {
    SetMessage(message, "unknown C++ exception in the V8 shim");
  }
  return PWV8_FAILED;
}

#if PWHOST_V8_NODE_PLATFORM
/// The foreground task queue of one isolate. V8 posts from any thread; the isolate's user runs
/// the tasks between calls (see RunPendingTasks), never while guest code runs.
class TaskQueue final : public v8::TaskRunner {
 public:
  void PostTask(std::unique_ptr<v8::Task> task) override { Push(std::move(task), 0); }
  void PostNonNestableTask(std::unique_ptr<v8::Task> task) override {
    Push(std::move(task), 0);
  }
  void PostDelayedTask(std::unique_ptr<v8::Task> task, double delay_in_seconds) override {
    Push(std::move(task), delay_in_seconds);
  }
  void PostNonNestableDelayedTask(std::unique_ptr<v8::Task> task,
                                  double delay_in_seconds) override {
    Push(std::move(task), delay_in_seconds);
  }
  void PostIdleTask(std::unique_ptr<v8::IdleTask>) override {
    // Never called: IdleTasksEnabled() is false.
  }
  bool IdleTasksEnabled() override { return false; }
  // Tasks only ever run outside guest code, so none is nested.
  bool NonNestableTasksEnabled() const override { return true; }
  bool NonNestableDelayedTasksEnabled() const override { return true; }

  /// Whether a task may be due: on the hot path, one relaxed load while nothing is queued, and
  /// a clock read while only delayed tasks wait.
  bool MaybeDue() const {
    if (pending_.load(std::memory_order_relaxed) == 0) return false;
    return Clock::now().time_since_epoch().count() >=
           earliest_due_.load(std::memory_order_relaxed);
  }

  /// Takes the first task that is due, if any.
  std::unique_ptr<v8::Task> PopDue() {
    std::lock_guard<std::mutex> lock(mutex_);
    auto now = Clock::now();
    for (auto it = tasks_.begin(); it != tasks_.end(); ++it) {
      if (it->due <= now) {
        std::unique_ptr<v8::Task> task = std::move(it->task);
        tasks_.erase(it);
        Update();
        return task;
      }
    }
    return nullptr;
  }

  /// How many tasks are queued.
  size_t Size() {
    std::lock_guard<std::mutex> lock(mutex_);
    return tasks_.size();
  }

 private:
  using Clock = std::chrono::steady_clock;
  struct Entry {
    Clock::time_point due;
    std::unique_ptr<v8::Task> task;
  };

  void Push(std::unique_ptr<v8::Task> task, double delay_in_seconds) {
    // Called by V8, which is built without exceptions: nothing may be thrown back. A task that
    // cannot be queued is dropped, as V8 allows for tasks posted around isolate shutdown.
    try {
      auto due = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(delay_in_seconds));
      std::lock_guard<std::mutex> lock(mutex_);
      tasks_.push_back(Entry{due, std::move(task)});
      Update();
    } catch (...) {
    }
  }

  /// Publishes the queue's size and earliest due time. The mutex is held.
  void Update() {
    Clock::rep earliest = Clock::time_point::max().time_since_epoch().count();
    for (const Entry& entry : tasks_) {
      earliest = std::min(earliest, entry.due.time_since_epoch().count());
    }
    earliest_due_.store(earliest, std::memory_order_relaxed);
    pending_.store(tasks_.size(), std::memory_order_relaxed);
  }

  std::mutex mutex_;
  std::deque<Entry> tasks_;
  std::atomic<size_t> pending_{0};
  std::atomic<Clock::rep> earliest_due_{0};
};

/// Gives Node's platform this shim's task queue for one isolate.
class Delegate final : public node::IsolatePlatformDelegate {
 public:
  std::shared_ptr<v8::TaskRunner> GetForegroundTaskRunner() override { return tasks; }
  bool IdleTasksEnabled() override { return false; }

  std::shared_ptr<TaskQueue> tasks = std::make_shared<TaskQueue>();
};
#endif  // PWHOST_V8_NODE_PLATFORM

/// A host function import: what its callback needs to find its way back to the host.
struct HostImport {
  pwv8_vm* vm;
  uint32_t index;
  pwv8_shape shape;
};

/// An exported function resolved by pwv8_vm_export_function.
struct ExportedFunction {
  v8::Global<v8::Function> function;
  pwv8_shape shape;
};

/// A number unique to the calling thread (pthread_t values are reused, these are not).
uint64_t ThreadToken() {
  static std::atomic<uint64_t> next{1};
  thread_local uint64_t token = next.fetch_add(1, std::memory_order_relaxed);
  return token;
}

/// The lowest address of the calling thread's stack (0 if unknown).
uintptr_t ThreadStackLow() {
  thread_local uintptr_t low = [] {
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) != 0) return uintptr_t{0};
    void* address = nullptr;
    size_t size = 0;
    int rc = pthread_attr_getstack(&attr, &address, &size);
    pthread_attr_destroy(&attr);
    return rc == 0 ? reinterpret_cast<uintptr_t>(address) : uintptr_t{0};
  }();
  return low;
}

}  // namespace

struct pwv8_module {
  v8::CompiledWasmModule compiled;
};

struct pwv8_vm {
  v8::Isolate* isolate = nullptr;
#if PWHOST_V8_NODE_PLATFORM
  Delegate delegate;
#endif
  v8::Global<v8::Context> context;
  v8::Global<v8::Object> exports;
  v8::Global<v8::Object> memory;
  std::vector<ExportedFunction> functions;
  std::vector<HostImport> imports;
  pwv8_host_fn host_fn = nullptr;
  void* host_context = nullptr;
  /// The thread (ThreadToken) whose stack limit the isolate has; 0: none yet.
  uint64_t stack_thread = 0;
  /// The threads (ThreadTokens) left inside an Unlocker by ParkThread.
  std::vector<uint64_t> parked_threads;
  /// The storage of the Locker and Unlocker of each parked thread. Their destructors run only
  /// for the thread that deletes the VM (UnparkThread), else never: that is what keeps the
  /// threads parked. Freed after the isolate is disposed.
  std::vector<void*> parked_storage;
  std::atomic<bool> heap_exhausted{false};
  /// Set by pwv8_vm_terminate, cleared by pwv8_vm_cancel_terminate. V8 keeps a termination request
  /// with the state of the thread holding the isolate's lock, which a Locker saves and restores
  /// (or initialises afresh): a request made just before a thread takes the lock can be lost. So
  /// every Entry renews a request this flag records.
  std::atomic<bool> stop_requested{false};
};

namespace {

/// Gives the isolate a stack limit for the current thread, if it runs on another thread than
/// last time: at most kStackBudget below here, and never closer than kStackMargin to the end of
/// the thread's stack (a guest that would need more fails with a stack overflow, not a crash).
void UseThreadStack(pwv8_vm* vm) {
  uint64_t token = ThreadToken();
  if (vm->stack_thread == token) return;
  uintptr_t here = reinterpret_cast<uintptr_t>(__builtin_frame_address(0));
  uintptr_t limit = here > kStackBudget ? here - kStackBudget : 0;
  uintptr_t low = ThreadStackLow();
  if (low != 0 && limit < low + kStackMargin) limit = low + kStackMargin;
  vm->isolate->SetStackLimit(limit);
  vm->stack_thread = token;
}

/// Leaves the calling thread inside an Unlocker within a Locker of the isolate, the first time
/// the thread calls into it: from then on a Locker on this thread finds the thread's state
/// archived, restores it and archives it again on exit, instead of initialising and freeing it.
void ParkThread(pwv8_vm* vm) {
  uint64_t token = ThreadToken();
  for (uint64_t parked : vm->parked_threads) {
    if (parked == token) return;
  }
  if (vm->parked_threads.size() >= kMaxParkedThreads) return;
  vm->parked_threads.reserve(vm->parked_threads.size() + 1);
  vm->parked_storage.reserve(vm->parked_storage.size() + 2);
  void* locker = ::operator new(sizeof(v8::Locker));
  void* unlocker = nullptr;
  try {
    unlocker = ::operator new(sizeof(v8::Unlocker));
  } catch (...) {
    ::operator delete(locker);
    throw;
  }
  new (locker) v8::Locker(vm->isolate);
  new (unlocker) v8::Unlocker(vm->isolate);
  vm->parked_storage.push_back(locker);
  vm->parked_storage.push_back(unlocker);
  vm->parked_threads.push_back(token);
}

/// Takes the calling thread out of the isolate if ParkThread left it parked, as a Locker that was
/// never parked would leave it: the Unlocker's destructor restores the thread's archived state
/// (taking the lock), the Locker's, a top-level one, frees it. Without this, every isolate a
/// thread called into would leave that state behind (what the archive holds, e.g. handle
/// blocks, is freed only when the thread restores it).
/// Only the calling thread can be unparked, and only while it holds no Locker of the isolate
/// (the Unlocker's destructor would wait for its own lock): then its state is left as before.
void UnparkThread(pwv8_vm* vm) {
  if (v8::Locker::IsLocked(vm->isolate)) return;
  uint64_t token = ThreadToken();
  for (size_t i = 0; i < vm->parked_threads.size(); ++i) {
    if (vm->parked_threads[i] != token) continue;
    auto* locker = static_cast<v8::Locker*>(vm->parked_storage[2 * i]);
    auto* unlocker = static_cast<v8::Unlocker*>(vm->parked_storage[2 * i + 1]);
    unlocker->~Unlocker();
    locker->~Locker();
    ::operator delete(unlocker);
    ::operator delete(locker);
    vm->parked_storage[2 * i] = nullptr;
    vm->parked_storage[2 * i + 1] = nullptr;
    vm->parked_threads[i] = 0;
    return;
  }
}

/// Whether an Entry parks the thread (only guest calls do: they are the hot path).
enum class Park { kNo, kYes };

/// An entry into the isolate from the host: locked, entered, with this thread's stack limit.
class Entry {
 public:
  explicit Entry(pwv8_vm* vm, Park park = Park::kNo)
      // Parking must happen before this entry's own Locker, which then finds the thread parked.
      : locker_((park == Park::kYes ? ParkThread(vm) : void(), vm->isolate)),
        isolate_scope_(vm->isolate) {
    UseThreadStack(vm);
    // The lock may have brought in a thread state without the stop requested for this call.
    if (vm->stop_requested.load()) vm->isolate->TerminateExecution();
  }

 private:
  v8::Locker locker_;
  v8::Isolate::Scope isolate_scope_;
};

/// Runs the foreground tasks V8 queued for this isolate that are due (GC steps, wasm code GC),
/// at most as many as were queued when it started. The isolate is entered and locked.
void RunPendingTasks(pwv8_vm* vm) {
#if PWHOST_V8_NODE_PLATFORM
  TaskQueue& tasks = *vm->delegate.tasks;
  if (!tasks.MaybeDue() || vm->stop_requested.load() || vm->isolate->IsExecutionTerminating()) {
    return;
  }
  size_t budget = tasks.Size();
  for (; budget > 0; --budget) {
    std::unique_ptr<v8::Task> task = tasks.PopDue();
    if (!task) break;
    v8::HandleScope scope(vm->isolate);
    task->Run();
  }
#else
  if (vm->stop_requested.load() || vm->isolate->IsExecutionTerminating()) return;
  // Bounded, in case tasks keep posting tasks.
  for (int budget = 64; budget > 0; --budget) {
    if (!v8::platform::PumpMessageLoop(g_platform, vm->isolate)) break;
  }
#endif
}

/// Called by V8 when the JS heap is about to run out: terminates the running call instead of
/// letting V8 abort the process, and grants the room the unwinding needs.
size_t NearHeapLimit(void* data, size_t current_heap_limit, size_t) {
  auto* vm = static_cast<pwv8_vm*>(data);
  vm->heap_exhausted.store(true);
  vm->isolate->TerminateExecution();
  return current_heap_limit + current_heap_limit / 2;
}

/// The text of the exception `try_catch` caught, e.g. "RuntimeError: unreachable".
std::string ExceptionText(v8::Isolate* isolate, const v8::TryCatch& try_catch) {
  if (!try_catch.HasCaught()) return "exception without a value";
  v8::String::Utf8Value text(isolate, try_catch.Exception());
  if (*text == nullptr) return "exception that cannot be converted to a string";
  return std::string(*text, text.length());
}

/// The status (and message) of a V8 call that returned nothing.
int32_t Failure(v8::Isolate* isolate, const v8::TryCatch& try_catch, pwv8_text* message) {
  if (try_catch.HasTerminated() || isolate->IsExecutionTerminating()) return PWV8_TERMINATED;
  if (try_catch.HasCaught()) {
    SetMessage(message, ExceptionText(isolate, try_catch));
    return PWV8_THROWN;
  }
  SetMessage(message, "V8 call failed without an exception");
  return PWV8_FAILED;
}

v8::MaybeLocal<v8::String> NewString(v8::Isolate* isolate, const char* data, size_t len) {
  if (len > static_cast<size_t>(v8::String::kMaxLength)) return {};
  return v8::String::NewFromUtf8(isolate, data, v8::NewStringType::kNormal,
                                 static_cast<int>(len));
}

/// The callback of every host function: arguments into slots, the host, slot 0 back out.
void HostCallback(const v8::FunctionCallbackInfo<v8::Value>& info) {
  v8::Isolate* isolate = info.GetIsolate();
  auto* import = static_cast<HostImport*>(info.Data().As<v8::External>()->Value());
  const pwv8_shape shape = import->shape;
  uint64_t slots[kMaxArgs];
  slots[0] = 0;
  for (uint32_t i = 0; i < shape.params && i < kMaxArgs; ++i) {
    v8::Local<v8::Value> arg = info[static_cast<int>(i)];
    // Wasm passes i32 as a Number and i64 as a BigInt; anything else means a caller other than
    // the guest, which gets a TypeError rather than a misread argument.
    if (shape.i64_params & (1u << i)) {
      if (!arg->IsBigInt()) {
        isolate->ThrowException(v8::Exception::TypeError(
            v8::String::NewFromUtf8Literal(isolate, "host function expects a BigInt")));
        return;
      }
      slots[i] = arg.As<v8::BigInt>()->Uint64Value();
    } else {
      if (!arg->IsInt32()) {
        isolate->ThrowException(v8::Exception::TypeError(
            v8::String::NewFromUtf8Literal(isolate, "host function expects an i32")));
        return;
      }
      slots[i] = static_cast<uint32_t>(arg.As<v8::Int32>()->Value());
    }
  }
  pwv8_vm* vm = import->vm;
  uint32_t count = shape.params > 0 ? shape.params : 1;
  if (vm->host_fn(vm->host_context, import->index, slots, count) != 0) {
    // The host remembers why; this exception only unwinds the guest. While a termination is
    // unwinding, throwing would replace it with a catchable exception: leave it alone.
    if (!isolate->IsExecutionTerminating()) {
      isolate->ThrowException(v8::Exception::Error(
          v8::String::NewFromUtf8Literal(isolate, "pwhost host function failed")));
    }
    return;
  }
  if (shape.result == 0) {
    info.GetReturnValue().Set(static_cast<int32_t>(static_cast<uint32_t>(slots[0])));
  } else if (shape.result == 1) {
    info.GetReturnValue().Set(v8::BigInt::New(isolate, static_cast<int64_t>(slots[0])));
  }
}

/// Calls `function` with the isolate entered, locked and in the instance's context.
int32_t CallFunction(pwv8_vm* vm, const ExportedFunction& function, const uint64_t* args,
                     uint64_t* results, pwv8_text* message) {
  v8::Isolate* isolate = vm->isolate;
  v8::HandleScope scope(isolate);
  v8::Local<v8::Context> context = vm->context.Get(isolate);
  v8::TryCatch try_catch(isolate);
  const pwv8_shape shape = function.shape;
  v8::Local<v8::Value> argv[kMaxArgs];
  for (uint32_t i = 0; i < shape.params; ++i) {
    if (shape.i64_params & (1u << i)) {
      argv[i] = v8::BigInt::New(isolate, static_cast<int64_t>(args[i]));
    } else {
      argv[i] = v8::Integer::New(isolate, static_cast<int32_t>(static_cast<uint32_t>(args[i])));
    }
  }
  v8::Local<v8::Value> result;
  if (!function.function.Get(isolate)
           ->Call(context, v8::Undefined(isolate), static_cast<int>(shape.params), argv)
           .ToLocal(&result)) {
    return Failure(isolate, try_catch, message);
  }
  if (shape.result == 0) {
    if (!result->IsInt32()) {
      SetMessage(message, "guest function returned something other than an i32");
      return PWV8_FAILED;
    }
    results[0] = static_cast<uint32_t>(result.As<v8::Int32>()->Value());
  } else if (shape.result == 1) {
    if (!result->IsBigInt()) {
      SetMessage(message, "guest function returned something other than an i64");
      return PWV8_FAILED;
    }
    results[0] = result.As<v8::BigInt>()->Uint64Value();
  }
  return PWV8_OK;
}

bool ValidShape(pwv8_shape shape) {
  return shape.params <= kMaxArgs && shape.result >= -1 && shape.result <= 1 &&
         (shape.params == kMaxArgs || (shape.i64_params >> shape.params) == 0);
}

/// Creates an isolate registered with the platform, with a context.
void DeleteVm(pwv8_vm* vm);

pwv8_vm* NewVm() {
  auto vm = std::make_unique<pwv8_vm>();
  v8::Isolate::CreateParams params;
  params.array_buffer_allocator = g_allocator;
  params.constraints.ConfigureDefaultsFromHeapSize(0, kMaxHeapBytes);
  v8::Isolate* isolate = v8::Isolate::Allocate();
#if PWHOST_V8_NODE_PLATFORM
  g_platform->RegisterIsolate(isolate, &vm->delegate);
#endif
  v8::Isolate::Initialize(isolate, params);
  vm->isolate = isolate;
  isolate->AddNearHeapLimitCallback(NearHeapLimit, vm.get());
  bool made = false;
  {
    v8::Locker locker(isolate);
    v8::Isolate::Scope isolate_scope(isolate);
    // Wasm queues no microtasks; never run them implicitly at the end of a call.
    isolate->SetMicrotasksPolicy(v8::MicrotasksPolicy::kExplicit);
    v8::HandleScope scope(isolate);
    v8::Local<v8::Context> context = v8::Context::New(isolate);
    made = !context.IsEmpty();
    if (made) vm->context.Reset(isolate, context);
  }
  // Every later entry enters this context: without one, fail this VM here rather than the
  // process at its first call.
  if (!made) {
    DeleteVm(vm.release());
    throw std::runtime_error("V8 could not create a context for the VM");
  }
  return vm.release();
}

void DeleteVm(pwv8_vm* vm) {
  v8::Isolate* isolate = vm->isolate;
  {
    v8::Locker locker(isolate);
    v8::Isolate::Scope isolate_scope(isolate);
    vm->functions.clear();
    vm->memory.Reset();
    vm->exports.Reset();
    vm->context.Reset();
  }
  UnparkThread(vm);
#if PWHOST_V8_NODE_PLATFORM
  // Node's order: unregister first, so no other isolate at the same address races with it.
  g_platform->UnregisterIsolate(isolate);
  isolate->Dispose();
#else
  v8::platform::NotifyIsolateShutdown(g_platform, isolate);
  isolate->Dispose();
#endif
  for (void* storage : vm->parked_storage) ::operator delete(storage);
  delete vm;
}

}  // namespace

extern "C" {

int32_t pwv8_initialize(const char* flags, size_t flags_len, uint32_t thread_pool_size,
                        pwv8_text* message) {
  try {
    static std::mutex mutex;
    std::lock_guard<std::mutex> lock(mutex);
    if (g_platform != nullptr) return PWV8_OK;
    if (flags_len > 0) {
      v8::V8::SetFlagsFromString(flags, flags_len);
    }
#if PWHOST_V8_NODE_PLATFORM
    std::unique_ptr<node::MultiIsolatePlatform> platform =
        node::MultiIsolatePlatform::Create(static_cast<int>(thread_pool_size));
#else
    std::unique_ptr<v8::Platform> platform =
        v8::platform::NewDefaultPlatform(static_cast<int>(thread_pool_size));
#endif
    if (!platform) {
      SetMessage(message, "cannot create the V8 platform");
      return PWV8_FAILED;
    }
    v8::V8::InitializePlatform(platform.get());
    if (!v8::V8::Initialize()) {
      SetMessage(message, "V8 failed to initialise");
      return PWV8_FAILED;
    }
    g_allocator = v8::ArrayBuffer::Allocator::NewDefaultAllocator();
    // V8 keeps using the platform until the process exits.
    g_platform = platform.release();
    return PWV8_OK;
  } catch (...) {
    return CaughtException(message);
  }
}

pwv8_module* pwv8_compile(const uint8_t* bytes, size_t len, pwv8_text* message) {
  pwv8_vm* vm = nullptr;
  try {
    if (g_platform == nullptr) {
      SetMessage(message, "V8 is not initialised");
      return nullptr;
    }
    // A short-lived isolate compiles; the code belongs to the process-wide wasm engine and lives
    // on in the CompiledWasmModule.
    vm = NewVm();
    pwv8_module* module = nullptr;
    {
      v8::Isolate* isolate = vm->isolate;
      v8::Locker locker(isolate);
      v8::Isolate::Scope isolate_scope(isolate);
      UseThreadStack(vm);
      v8::HandleScope scope(isolate);
      v8::Context::Scope context_scope(vm->context.Get(isolate));
      v8::TryCatch try_catch(isolate);
      v8::Local<v8::WasmModuleObject> compiled;
      if (v8::WasmModuleObject::Compile(isolate, v8::MemorySpan<const uint8_t>(bytes, len))
              .ToLocal(&compiled)) {
        module = new pwv8_module{compiled->GetCompiledModule()};
      } else {
        SetMessage(message, try_catch.HasCaught() ? ExceptionText(isolate, try_catch)
                                                  : std::string("compilation failed"));
      }
    }
    DeleteVm(vm);
    return module;
  } catch (...) {
    CaughtException(message);
    if (vm != nullptr) {
      try {
        DeleteVm(vm);
      } catch (...) {
      }
    }
    return nullptr;
  }
}

void pwv8_module_delete(pwv8_module* module) { delete module; }

pwv8_vm* pwv8_vm_new(pwv8_text* message) {
  try {
    if (g_platform == nullptr) {
      SetMessage(message, "V8 is not initialised");
      return nullptr;
    }
    return NewVm();
  } catch (...) {
    CaughtException(message);
    return nullptr;
  }
}

int32_t pwv8_vm_instantiate(pwv8_vm* vm, const pwv8_module* module, const pwv8_import* imports,
                            size_t import_count, pwv8_host_fn host_fn, void* host_context,
                            pwv8_text* message) {
  try {
    v8::Isolate* isolate = vm->isolate;
    Entry entry(vm);
    v8::HandleScope scope(isolate);
    v8::Local<v8::Context> context = vm->context.Get(isolate);
    v8::Context::Scope context_scope(context);
    v8::TryCatch try_catch(isolate);
    if (!vm->imports.empty() || !vm->exports.IsEmpty()) {
      SetMessage(message, "the instance is already instantiated");
      return PWV8_FAILED;
    }
    vm->host_fn = host_fn;
    vm->host_context = host_context;
    // Filled completely before any External points into it: it never reallocates afterwards.
    vm->imports.reserve(import_count);
    for (size_t i = 0; i < import_count; ++i) {
      if (!ValidShape(imports[i].shape)) {
        SetMessage(message, "invalid host function shape");
        return PWV8_FAILED;
      }
      vm->imports.push_back(HostImport{vm, static_cast<uint32_t>(i), imports[i].shape});
    }
    v8::Local<v8::Object> import_object = v8::Object::New(isolate);
    for (size_t i = 0; i < import_count; ++i) {
      const pwv8_import& import = imports[i];
      v8::Local<v8::String> module_name;
      v8::Local<v8::String> name;
      if (!NewString(isolate, import.module, import.module_len).ToLocal(&module_name) ||
          !NewString(isolate, import.name, import.name_len).ToLocal(&name)) {
        SetMessage(message, "import name too long");
        return PWV8_FAILED;
      }
      v8::Local<v8::Value> existing;
      if (!import_object->Get(context, module_name).ToLocal(&existing)) {
        return Failure(isolate, try_catch, message);
      }
      v8::Local<v8::Object> namespace_object;
      if (existing->IsObject()) {
        namespace_object = existing.As<v8::Object>();
      } else {
        namespace_object = v8::Object::New(isolate);
        if (import_object->Set(context, module_name, namespace_object).IsNothing()) {
          return Failure(isolate, try_catch, message);
        }
      }
      v8::Local<v8::FunctionTemplate> function_template = v8::FunctionTemplate::New(
          isolate, HostCallback, v8::External::New(isolate, &vm->imports[i]), {},
          static_cast<int>(import.shape.params), v8::ConstructorBehavior::kThrow);
      v8::Local<v8::Function> function;
      if (!function_template->GetFunction(context).ToLocal(&function) ||
          namespace_object->Set(context, name, function).IsNothing()) {
        return Failure(isolate, try_catch, message);
      }
    }
    v8::Local<v8::WasmModuleObject> module_object;
    if (!v8::WasmModuleObject::FromCompiledModule(isolate, module->compiled)
             .ToLocal(&module_object)) {
      return Failure(isolate, try_catch, message);
    }
    v8::Local<v8::Value> webassembly;
    v8::Local<v8::Value> instance_constructor;
    if (!context->Global()
             ->Get(context, v8::String::NewFromUtf8Literal(isolate, "WebAssembly"))
             .ToLocal(&webassembly) ||
        !webassembly->IsObject() ||
        !webassembly.As<v8::Object>()
             ->Get(context, v8::String::NewFromUtf8Literal(isolate, "Instance"))
             .ToLocal(&instance_constructor) ||
        !instance_constructor->IsFunction()) {
      SetMessage(message, "this V8 has no WebAssembly.Instance");
      return PWV8_FAILED;
    }
    v8::Local<v8::Value> argv[2] = {module_object, import_object};
    v8::Local<v8::Object> instance;
    // When the start function traps, V8 10.2 returns the receiver it allocated for `new` with
    // the exception caught: a failure only the TryCatch shows.
    if (!instance_constructor.As<v8::Function>()->NewInstance(context, 2, argv).ToLocal(&instance) ||
        try_catch.HasCaught() || isolate->IsExecutionTerminating()) {
      return Failure(isolate, try_catch, message);
    }
    v8::Local<v8::Value> exports;
    if (!instance->Get(context, v8::String::NewFromUtf8Literal(isolate, "exports"))
             .ToLocal(&exports) ||
        !exports->IsObject()) {
      return Failure(isolate, try_catch, message);
    }
    vm->exports.Reset(isolate, exports.As<v8::Object>());
    v8::Local<v8::Value> memory;
    if (!exports.As<v8::Object>()
             ->Get(context, v8::String::NewFromUtf8Literal(isolate, "memory"))
             .ToLocal(&memory)) {
      return Failure(isolate, try_catch, message);
    }
    if (memory->IsWasmMemoryObject()) {
      vm->memory.Reset(isolate, memory.As<v8::Object>());
    }
    RunPendingTasks(vm);
    return PWV8_OK;
  } catch (...) {
    return CaughtException(message);
  }
}

int32_t pwv8_vm_export_function(pwv8_vm* vm, const char* name, size_t name_len,
                                pwv8_shape shape) {
  try {
    if (!ValidShape(shape) || vm->exports.IsEmpty()) return -1;
    v8::Isolate* isolate = vm->isolate;
    Entry entry(vm);
    v8::HandleScope scope(isolate);
    v8::Local<v8::Context> context = vm->context.Get(isolate);
    v8::Context::Scope context_scope(context);
    v8::TryCatch try_catch(isolate);
    v8::Local<v8::String> key;
    v8::Local<v8::Value> value;
    if (!NewString(isolate, name, name_len).ToLocal(&key) ||
        !vm->exports.Get(isolate)->Get(context, key).ToLocal(&value) || !value->IsFunction()) {
      return -1;
    }
    if (vm->functions.size() >= static_cast<size_t>(INT32_MAX)) return -1;
    vm->functions.push_back(
        ExportedFunction{v8::Global<v8::Function>(isolate, value.As<v8::Function>()), shape});
    return static_cast<int32_t>(vm->functions.size() - 1);
  } catch (...) {
    return -1;
  }
}

int32_t pwv8_vm_call(pwv8_vm* vm, uint32_t index, const uint64_t* args, uint32_t arg_count,
                     uint64_t* results, uint32_t result_count, int32_t nested,
                     pwv8_text* message) {
  try {
    if (index >= vm->functions.size()) {
      SetMessage(message, "unknown guest function");
      return PWV8_FAILED;
    }
    const ExportedFunction& function = vm->functions[index];
    if (arg_count != function.shape.params ||
        result_count != (function.shape.result < 0 ? 0u : 1u)) {
      SetMessage(message, "argument or result count does not match the function");
      return PWV8_FAILED;
    }
    if (vm->heap_exhausted.load()) {
      SetMessage(message, "the instance exhausted its JS heap earlier and runs no more calls");
      return PWV8_FAILED;
    }
    if (nested) return CallFunction(vm, function, args, results, message);
    v8::Isolate* isolate = vm->isolate;
    Entry entry(vm, Park::kYes);
    v8::HandleScope scope(isolate);
    v8::Context::Scope context_scope(vm->context.Get(isolate));
    int32_t status = CallFunction(vm, function, args, results, message);
    RunPendingTasks(vm);
    return status;
  } catch (...) {
    return CaughtException(message);
  }
}

int32_t pwv8_vm_memory(pwv8_vm* vm, int32_t nested, uint8_t** base, size_t* len) {
  *base = nullptr;
  *len = 0;
  try {
    if (vm->memory.IsEmpty()) return PWV8_OK;
    v8::Isolate* isolate = vm->isolate;
    auto read = [&] {
      v8::HandleScope scope(isolate);
      // The buffer is replaced (the old one detached) when the memory grows: look it up anew.
      v8::Local<v8::ArrayBuffer> buffer = vm->memory.Get(isolate).As<v8::WasmMemoryObject>()->Buffer();
      *base = static_cast<uint8_t*>(buffer->Data());
      *len = buffer->ByteLength();
    };
    if (nested) {
      read();
    } else {
      Entry entry(vm);
      read();
    }
    if (*base == nullptr) *len = 0;
    return PWV8_OK;
  } catch (...) {
    *base = nullptr;
    *len = 0;
    return PWV8_FAILED;
  }
}

int32_t pwv8_vm_heap_exhausted(const pwv8_vm* vm) { return vm->heap_exhausted.load() ? 1 : 0; }

void pwv8_vm_terminate(pwv8_vm* vm) {
  // Recorded first: an Entry that takes the lock after this request may have wiped it, but then
  // it sees the flag and renews the request.
  vm->stop_requested.store(true);
  vm->isolate->TerminateExecution();
}

void pwv8_vm_cancel_terminate(pwv8_vm* vm) {
  // Under the lock: that is where this thread's state, and a request saved with it, is live.
  v8::Locker locker(vm->isolate);
  vm->stop_requested.store(false);
  vm->isolate->CancelTerminateExecution();
}

void pwv8_vm_delete(pwv8_vm* vm) {
  try {
    DeleteVm(vm);
  } catch (...) {
  }
}

int64_t pwv8_current_thread_cpu_clock(void) {
  clockid_t clock;
  if (pthread_getcpuclockid(pthread_self(), &clock) != 0) return -1;
  return static_cast<int64_t>(clock);
}

int64_t pwv8_cpu_time_ns(int64_t clock) {
  struct timespec time;
  if (clock_gettime(static_cast<clockid_t>(clock), &time) != 0) return -1;
  return static_cast<int64_t>(time.tv_sec) * 1000000000 + time.tv_nsec;
}

void pwv8_text_free(pwv8_text text) { std::free(text.ptr); }

}  // extern "C"
