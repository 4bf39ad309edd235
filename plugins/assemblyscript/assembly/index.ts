// http_headers: AssemblyScript Proxy-Wasm SDK plugin (@solo-io/proxy-runtime 0.1.8, ABI 0.2.0).
// Built by plugins/build.sh into dist/assemblyscript/http_headers.wasm.
//
// What a host test observes:
// - Request headers: adds `x-as-plugin: hello` and `x-as-config: <plugin configuration>` (the
//   configuration as UTF-8, read with proxy_get_buffer_bytes(PLUGIN_CONFIGURATION); empty value
//   when there is none or the read fails), logs `as plugin saw <:path>` at info, returns
//   Continue.
// - Root id: the SDK looks its root context factory up by the `plugin_root_id` property; this
//   plugin registers the empty root id "" (pwhost's default). Any other root id makes the SDK
//   throw -> abort -> `wasi_unstable.proc_exit(255)` during proxy_on_context_create.
// - The SDK logs a lot at debug level (context creation, onConfigure, ...).
// - Module shape: no `_start`/`_initialize`; top-level code runs in the wasm start section
//   during instantiation. Exports `malloc` (not proxy_on_memory_allocate) and
//   `proxy_abi_version_0_2_0`; imports `wasi_unstable.proc_exit` (for abort) plus env.proxy_*.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext,
  Context,
  registerRootContext,
  FilterHeadersStatusValues,
  LogLevelValues,
  log,
  stream_context,
} from "@solo-io/proxy-runtime";
import { get_buffer_bytes, BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

class HttpHeadersRoot extends RootContext {
  config: string = "";

  // Not super.onConfigure(): in proxy-runtime 0.1.8 it passes `configuration_size` as the
  // return-size *pointer* of proxy_get_buffer_bytes (so the host writes a u32 to that low
  // address and the SDK decodes a stale size), and it aborts on any non-OK status.
  onConfigure(configuration_size: u32): bool {
    if (configuration_size == 0) {
      this.config = "";
    } else {
      const raw = get_buffer_bytes(BufferTypeValues.PluginConfiguration, 0, configuration_size);
      this.config = String.UTF8.decode(raw);
    }
    return true;
  }

  createContext(context_id: u32): Context {
    return new HttpHeaders(context_id, this);
  }
}

class HttpHeaders extends Context {
  config: string;

  constructor(context_id: u32, root_context: HttpHeadersRoot) {
    super(context_id, root_context);
    this.config = root_context.config;
  }

  onRequestHeaders(num_headers: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const path = stream_context.headers.request.get(":path");
    log(LogLevelValues.info, "as plugin saw " + path);
    stream_context.headers.request.add("x-as-plugin", "hello");
    stream_context.headers.request.add("x-as-config", this.config);
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32): RootContext => {
  return new HttpHeadersRoot(context_id);
}, "");
