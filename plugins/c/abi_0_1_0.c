/*
 * abi_0_1_0: a Proxy-Wasm ABI 0.1.0 HTTP filter (no registry SDK emits 0.1.0 any more).
 * Built by plugins/build.sh with clang-19 + wasi-libc into dist/c/abi_0_1_0.wasm.
 *
 * Module shape: exports `proxy_abi_version_0_1_0`, `memory`, `malloc` (wasi-libc's), and `_start`
 * (a WASI command: wasi-libc's crt1-command.o runs the constructors, calls the empty `main`, and
 * returns normally because main returns 0 -- proc_exit is only called for a non-zero status).
 * No `_initialize` and no `proxy_on_memory_allocate`: the host must call `_start` once and use
 * `malloc` to hand data back. Because it is a command module, wasm-ld wraps every other export
 * (callbacks and malloc) to call wasi-libc's `__wasm_call_dtors` after it returns; with nothing
 * registered via atexit and no stdio use those are no-ops. Imports `wasi_snapshot_preview1.
 * proc_exit` (reachable only from exit() for a non-zero main status, i.e. never).
 *
 * Host functions used (imported from "env", 0.1.0 signatures as registered by
 * proxy-wasm-cpp-host; all return a proxy_status_t):
 *   proxy_log(level, ptr, len)
 *   proxy_get_configuration(char **ptr, size_t *size)        -- 0.1.0 only
 *   proxy_get_header_map_value(map, key, key_len, char **ptr, size_t *size)
 *   proxy_add_header_map_value(map, key, key_len, value, value_len)
 *   proxy_clear_route_cache()                                -- 0.1.0 only, () -> i32
 *   proxy_continue_request()                                 -- 0.1.0 only, () -> i32
 *   proxy_continue_response()                                -- 0.1.0 only, () -> i32
 * The spec text (abi-versions/v0.1.0) lists the last three with no params and *no* return
 * value; proxy-wasm-cpp-host registers them as `Word f()`, i.e. `() -> i32`, like the C++ SDK of
 * the 0.1.0 era declared them. This module follows cpp-host, so a host must provide () -> i32.
 * The VM start callback is `proxy_on_vm_start` in both the spec and cpp-host (`proxy_on_start`
 * predates 0.1.0).
 *
 * What a host test observes (all logs at info, exact text):
 * - proxy_on_vm_start(root, size) -> 1: logs `0.1.0 vm configuration: <text>` (VM config read
 *   with proxy_get_configuration; empty text if none).
 * - proxy_on_configure(root, size) -> 1: logs `0.1.0 configuration: <text>` (plugin config read
 *   with the same proxy_get_configuration). If that call fails, it logs
 *   `0.1.0 configuration unavailable: status <n>` (and likewise for the VM configuration).
 * - proxy_on_request_headers(ctx, num_headers) -- TWO arguments in 0.1.0:
 *   logs `0.1.0 request headers: <num_headers>`, adds request header `x-abi: 0.1.0`, calls
 *   proxy_clear_route_cache() and adds `x-clear-route-cache: <status>` (0 from a correct host);
 *   returns 1 (Pause) if the request has header `x-pause`, else 0 (Continue).
 * - proxy_on_request_body(ctx, size, eos): if this stream paused in request headers, calls
 *   proxy_continue_request(), logs `continue_request: <status>` and clears the pause; returns 0.
 *   So a request with `x-pause` and a body is forwarded (with x-abi and x-clear-route-cache) once
 *   the first body chunk arrives; without a body chunk it stays paused.
 * - proxy_on_response_headers(ctx, num_headers) (two arguments): adds response header
 *   `x-abi-response: 0.1.0`; returns 1 (Pause) if the upstream response has header `x-pause`,
 *   else 0.
 * - proxy_on_response_body(ctx, size, eos): if the response was paused, calls
 *   proxy_continue_response(), logs `continue_response: <status>`; returns 0.
 * - proxy_on_context_create, proxy_on_done (-> 1) and proxy_on_delete are exported too.
 */

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define IMPORT(name) __attribute__((import_module("env"), import_name(#name)))
#define EXPORT(name) __attribute__((export_name(#name)))

enum { LOG_INFO = 2 };
enum { MAP_REQUEST_HEADERS = 0, MAP_RESPONSE_HEADERS = 2 };
enum { CONTINUE = 0, PAUSE = 1 };

IMPORT(proxy_log) int32_t proxy_log(uint32_t level, const char *data, size_t size);
IMPORT(proxy_get_configuration) int32_t proxy_get_configuration(char **data, size_t *size);
IMPORT(proxy_get_header_map_value)
int32_t proxy_get_header_map_value(uint32_t map, const char *key, size_t key_size, char **value,
                                   size_t *value_size);
IMPORT(proxy_add_header_map_value)
int32_t proxy_add_header_map_value(uint32_t map, const char *key, size_t key_size,
                                   const char *value, size_t value_size);
IMPORT(proxy_clear_route_cache) int32_t proxy_clear_route_cache(void);
IMPORT(proxy_continue_request) int32_t proxy_continue_request(void);
IMPORT(proxy_continue_response) int32_t proxy_continue_response(void);

/* A WASI command needs a main; all the work happens in the callbacks. */
int main(void) { return 0; }

EXPORT(proxy_abi_version_0_1_0) void proxy_abi_version_0_1_0(void) {}

/* ---- helpers ------------------------------------------------------------------------------ */

/* Logs prefix + text at info. */
static void log_info2(const char *prefix, const char *text, size_t text_size) {
    size_t prefix_size = strlen(prefix);
    char *message = malloc(prefix_size + text_size);
    if (message == NULL) return;
    memcpy(message, prefix, prefix_size);
    memcpy(message + prefix_size, text, text_size);
    proxy_log(LOG_INFO, message, prefix_size + text_size);
    free(message);
}

/* Writes the decimal form of value into buf (at least 11 bytes); returns its length. */
static size_t format_u32(uint32_t value, char *buf) {
    char tmp[10];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value != 0);
    for (size_t i = 0; i < n; i++) buf[i] = tmp[n - 1 - i];
    return n;
}

static void log_info_u32(const char *prefix, uint32_t value) {
    char buf[11];
    log_info2(prefix, buf, format_u32(value, buf));
}

static void add_header(uint32_t map, const char *key, const char *value, size_t value_size) {
    proxy_add_header_map_value(map, key, strlen(key), value, value_size);
}

static int has_header(uint32_t map, const char *key) {
    char *value = NULL;
    size_t size = 0;
    int32_t status = proxy_get_header_map_value(map, key, strlen(key), &value, &size);
    int found = status == 0 && value != NULL;
    free(value);
    return found;
}

/* Reads the VM or plugin configuration (whichever the current callback has) and logs it. */
static void log_configuration(const char *what) {
    char *data = NULL;
    size_t size = 0;
    int32_t status = proxy_get_configuration(&data, &size);
    char prefix[64];
    size_t n = strlen(what);
    memcpy(prefix, what, n);
    if (status == 0) {
        memcpy(prefix + n, ": ", 3);
        log_info2(prefix, data, data == NULL ? 0 : size);
    } else {
        memcpy(prefix + n, " unavailable: status ", 22);
        log_info_u32(prefix, (uint32_t)status);
    }
    free(data);
}

/* Streams paused in request/response headers (the tests use few concurrent streams). */
#define MAX_PAUSED 64
enum { PAUSED_REQUEST = 1, PAUSED_RESPONSE = 2 };
static struct {
    uint32_t context_id;
    uint32_t flags;
} paused[MAX_PAUSED];

static void set_paused(uint32_t context_id, uint32_t flag) {
    for (int i = 0; i < MAX_PAUSED; i++) {
        if (paused[i].context_id == context_id) {
            paused[i].flags |= flag;
            return;
        }
    }
    for (int i = 0; i < MAX_PAUSED; i++) {
        if (paused[i].context_id == 0) {
            paused[i].context_id = context_id;
            paused[i].flags = flag;
            return;
        }
    }
}

/* Clears flag for context_id; returns whether it was set. */
static int take_paused(uint32_t context_id, uint32_t flag) {
    for (int i = 0; i < MAX_PAUSED; i++) {
        if (paused[i].context_id == context_id && (paused[i].flags & flag)) {
            paused[i].flags &= ~flag;
            if (paused[i].flags == 0) paused[i].context_id = 0;
            return 1;
        }
    }
    return 0;
}

/* ---- callbacks (0.1.0 signatures) ------------------------------------------------------- */

EXPORT(proxy_on_context_create)
void proxy_on_context_create(uint32_t context_id, uint32_t parent_context_id) {
    (void)context_id;
    (void)parent_context_id;
}

EXPORT(proxy_on_vm_start) uint32_t proxy_on_vm_start(uint32_t root_context_id, uint32_t size) {
    (void)root_context_id;
    (void)size;
    log_configuration("0.1.0 vm configuration");
    return 1;
}

EXPORT(proxy_on_configure) uint32_t proxy_on_configure(uint32_t root_context_id, uint32_t size) {
    (void)root_context_id;
    (void)size;
    log_configuration("0.1.0 configuration");
    return 1;
}

EXPORT(proxy_on_request_headers)
uint32_t proxy_on_request_headers(uint32_t context_id, uint32_t num_headers) {
    char buf[11];
    log_info_u32("0.1.0 request headers: ", num_headers);
    add_header(MAP_REQUEST_HEADERS, "x-abi", "0.1.0", 5);
    int32_t status = proxy_clear_route_cache();
    add_header(MAP_REQUEST_HEADERS, "x-clear-route-cache", buf, format_u32((uint32_t)status, buf));
    if (has_header(MAP_REQUEST_HEADERS, "x-pause")) {
        set_paused(context_id, PAUSED_REQUEST);
        return PAUSE;
    }
    return CONTINUE;
}

EXPORT(proxy_on_request_body)
uint32_t proxy_on_request_body(uint32_t context_id, uint32_t body_size, uint32_t end_of_stream) {
    (void)body_size;
    (void)end_of_stream;
    if (take_paused(context_id, PAUSED_REQUEST)) {
        log_info_u32("continue_request: ", (uint32_t)proxy_continue_request());
    }
    return CONTINUE;
}

EXPORT(proxy_on_response_headers)
uint32_t proxy_on_response_headers(uint32_t context_id, uint32_t num_headers) {
    (void)num_headers;
    add_header(MAP_RESPONSE_HEADERS, "x-abi-response", "0.1.0", 5);
    if (has_header(MAP_RESPONSE_HEADERS, "x-pause")) {
        set_paused(context_id, PAUSED_RESPONSE);
        return PAUSE;
    }
    return CONTINUE;
}

EXPORT(proxy_on_response_body)
uint32_t proxy_on_response_body(uint32_t context_id, uint32_t body_size, uint32_t end_of_stream) {
    (void)body_size;
    (void)end_of_stream;
    if (take_paused(context_id, PAUSED_RESPONSE)) {
        log_info_u32("continue_response: ", (uint32_t)proxy_continue_response());
    }
    return CONTINUE;
}

EXPORT(proxy_on_done) uint32_t proxy_on_done(uint32_t context_id) {
    (void)context_id;
    return 1;
}

EXPORT(proxy_on_delete) void proxy_on_delete(uint32_t context_id) {
    take_paused(context_id, PAUSED_REQUEST);
    take_paused(context_id, PAUSED_RESPONSE);
}
