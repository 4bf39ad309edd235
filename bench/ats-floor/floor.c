/*
 * The native floor for bench/traffic-server.sh: a Traffic Server plugin in C that does, on
 * Traffic Server's own API, the work pwhost_ats.so does for the corpus's http_headers plugin,
 * and nothing else: no VM, no Proxy-Wasm, no configuration. What it costs is what any plugin
 * doing that work costs Traffic Server; pwhost_ats.so's cost beyond it is pwhost's.
 *
 * Per transaction, as pwhost_ats.so with http_headers:
 *   - read request header: every field's name and value read (the plugin reads all headers),
 *     the method, URL path and Host read (the pseudo-headers); `x-pwhost-plugin: http_headers`
 *     added, `user-agent` replaced if present, `x-remove-me` removed, `x-reset-at-trailers`
 *     looked up; a continuation with the read-response-header and close hooks, and a response
 *     transform (the plugin has a response body callback);
 *   - read response header: `x-powered-by: pwhost` added, `server` removed;
 *   - response transform: every byte passed through (copied out and back, as a body callback
 *     sees it), written on with an unknown length, as pwhost does;
 *   - close: the URL path read (the plugin's on_log), the continuation destroyed.
 * pwhost_ats.so also hooks the send-response-header event (for responses Traffic Server makes
 * itself); the floor does not, so that event's cost counts as pwhost's.
 *
 * Build: cc -O2 -shared -fPIC -o floor.so floor.c (bench/traffic-server.sh does).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <ts/ts.h>

#define NAME "pwhost_floor"

/* Reads every byte of a string Traffic Server lends, as a copy into the plugin would. */
static _Thread_local volatile unsigned sink;
static void
touch(const char *bytes, int len)
{
  unsigned sum = 0;
  for (int i = 0; i < len; i++) {
    sum += (unsigned char)bytes[i];
  }
  sink += sum;
}

static TSMLoc
find(TSMBuffer buffer, TSMLoc header, const char *name)
{
  return TSMimeHdrFieldFind(buffer, header, name, (int)strlen(name));
}

static void
add_field(TSMBuffer buffer, TSMLoc header, const char *name, const char *value)
{
  TSMLoc field;
  if (TSMimeHdrFieldCreateNamed(buffer, header, name, (int)strlen(name), &field) != TS_SUCCESS) {
    return;
  }
  TSMimeHdrFieldValueStringSet(buffer, header, field, -1, value, (int)strlen(value));
  TSMimeHdrFieldAppend(buffer, header, field);
  TSHandleMLocRelease(buffer, header, field);
}

static void
remove_fields(TSMBuffer buffer, TSMLoc header, const char *name)
{
  TSMLoc field;
  while ((field = find(buffer, header, name)) != TS_NULL_MLOC) {
    TSMimeHdrFieldDestroy(buffer, header, field);
    TSHandleMLocRelease(buffer, header, field);
  }
}

static void
read_url_path(TSMBuffer buffer, TSMLoc header)
{
  TSMLoc url;
  int len = 0;
  if (TSHttpHdrUrlGet(buffer, header, &url) != TS_SUCCESS) {
    return;
  }
  const char *path = TSUrlPathGet(buffer, url, &len);
  touch(path, len);
  TSHandleMLocRelease(buffer, header, url);
}

static void
on_request(TSHttpTxn txn)
{
  TSMBuffer buffer;
  TSMLoc header;
  if (TSHttpTxnClientReqGet(txn, &buffer, &header) != TS_SUCCESS) {
    return;
  }
  int len = 0;
  const char *method = TSHttpHdrMethodGet(buffer, header, &len);
  touch(method, len);
  read_url_path(buffer, header);
  TSMLoc field = TSMimeHdrFieldGet(buffer, header, 0);
  while (field != TS_NULL_MLOC) {
    const char *name = TSMimeHdrFieldNameGet(buffer, header, field, &len);
    touch(name, len);
    const char *value = TSMimeHdrFieldValueStringGet(buffer, header, field, -1, &len);
    touch(value, len);
    TSMLoc next = TSMimeHdrFieldNext(buffer, header, field);
    TSHandleMLocRelease(buffer, header, field);
    field = next;
  }
  add_field(buffer, header, "x-pwhost-plugin", "http_headers");
  field = find(buffer, header, "user-agent");
  if (field != TS_NULL_MLOC) {
    TSMimeHdrFieldValueStringSet(buffer, header, field, -1, "pwhost-test", 11);
    TSHandleMLocRelease(buffer, header, field);
  }
  remove_fields(buffer, header, "x-remove-me");
  field = find(buffer, header, "x-reset-at-trailers");
  if (field != TS_NULL_MLOC) {
    TSHandleMLocRelease(buffer, header, field);
  }
  TSHandleMLocRelease(buffer, TS_NULL_MLOC, header);
}

static void
on_response(TSHttpTxn txn)
{
  TSMBuffer buffer;
  TSMLoc header;
  if (TSHttpTxnServerRespGet(txn, &buffer, &header) != TS_SUCCESS) {
    return;
  }
  add_field(buffer, header, "x-powered-by", "pwhost");
  remove_fields(buffer, header, "server");
  TSHandleMLocRelease(buffer, TS_NULL_MLOC, header);
}

static void
on_close(TSHttpTxn txn)
{
  TSMBuffer buffer;
  TSMLoc header;
  if (TSHttpTxnClientReqGet(txn, &buffer, &header) == TS_SUCCESS) {
    read_url_path(buffer, header);
    TSHandleMLocRelease(buffer, TS_NULL_MLOC, header);
  }
}

/* The response transform: Traffic Server's null-transform pattern, bytes copied out of the
 * input and written to the output. */
struct transform {
  TSIOBuffer buffer;
  TSIOBufferReader reader;
  TSVIO output;
  char *chunk;
  int64_t chunk_size;
  int done;
};

static void
transfer(TSCont connection, struct transform *state)
{
  TSVIO input = TSVConnWriteVIOGet(connection);
  if (state->done) {
    return;
  }
  if (state->output == NULL) {
    state->buffer = TSIOBufferCreate();
    state->reader = TSIOBufferReaderAlloc(state->buffer);
    state->output = TSVConnWrite(TSTransformOutputVConnGet(connection), connection, state->reader, INT64_MAX);
  }
  int open = TSVIOBufferGet(input) != NULL;
  int64_t copied = 0;
  if (open) {
    int64_t todo = TSVIONTodoGet(input);
    TSIOBufferReader reader = TSVIOReaderGet(input);
    int64_t available = TSIOBufferReaderAvail(reader);
    if (available > todo) {
      available = todo;
    }
    if (available > 0) {
      if (available > state->chunk_size) {
        char *grown = realloc(state->chunk, (size_t)available);
        if (grown == NULL) {
          TSContCall(TSVIOContGet(input), TS_EVENT_ERROR, input);
          return;
        }
        state->chunk      = grown;
        state->chunk_size = available;
      }
      TSIOBufferBlock block = TSIOBufferReaderStart(reader);
      while (block != NULL && copied < available) {
        int64_t block_len = 0;
        const char *start = TSIOBufferBlockReadStart(block, reader, &block_len);
        if (block_len > available - copied) {
          block_len = available - copied;
        }
        memcpy(state->chunk + copied, start, (size_t)block_len);
        copied += block_len;
        block = TSIOBufferBlockNext(block);
      }
      TSIOBufferReaderConsume(reader, available);
      TSVIONDoneSet(input, TSVIONDoneGet(input) + available);
      TSIOBufferWrite(state->buffer, state->chunk, copied);
    }
  }
  if (!open || TSVIONTodoGet(input) <= 0) {
    state->done = 1;
    TSVIONBytesSet(state->output, TSVIONDoneGet(input));
    TSVIOReenable(state->output);
    if (open) {
      TSContCall(TSVIOContGet(input), TS_EVENT_VCONN_WRITE_COMPLETE, input);
    }
  } else {
    if (copied > 0) {
      TSVIOReenable(state->output);
    }
    TSContCall(TSVIOContGet(input), TS_EVENT_VCONN_WRITE_READY, input);
  }
}

static int
on_transform_event(TSCont connection, TSEvent event, void *data)
{
  (void)data;
  struct transform *state = TSContDataGet(connection);
  if (TSVConnClosedGet(connection)) {
    if (state->output != NULL) {
      TSIOBufferReaderFree(state->reader);
      TSIOBufferDestroy(state->buffer);
    }
    free(state->chunk);
    free(state);
    TSContDestroy(connection);
    return 0;
  }
  switch (event) {
  case TS_EVENT_ERROR: {
    TSVIO input = TSVConnWriteVIOGet(connection);
    TSContCall(TSVIOContGet(input), TS_EVENT_ERROR, input);
    break;
  }
  case TS_EVENT_VCONN_WRITE_COMPLETE:
    TSVConnShutdown(TSTransformOutputVConnGet(connection), 0, 1);
    break;
  default:
    transfer(connection, state);
    break;
  }
  return 0;
}

static int
on_transaction_event(TSCont cont, TSEvent event, void *data)
{
  TSHttpTxn txn = data;
  if (event == TS_EVENT_HTTP_READ_RESPONSE_HDR) {
    on_response(txn);
  } else if (event == TS_EVENT_HTTP_TXN_CLOSE) {
    on_close(txn);
    TSContDestroy(cont);
  }
  TSHttpTxnReenable(txn, TS_EVENT_HTTP_CONTINUE);
  return 0;
}

static int
on_read_request(TSCont cont, TSEvent event, void *data)
{
  (void)cont;
  (void)event;
  TSHttpTxn txn = data;
  on_request(txn);
  TSCont transaction = TSContCreate(on_transaction_event, NULL);
  TSHttpTxnHookAdd(txn, TS_HTTP_READ_RESPONSE_HDR_HOOK, transaction);
  TSHttpTxnHookAdd(txn, TS_HTTP_TXN_CLOSE_HOOK, transaction);
  struct transform *state = calloc(1, sizeof(struct transform));
  if (state != NULL) {
    TSVConn connection = TSTransformCreate(on_transform_event, txn);
    TSContDataSet(connection, state);
    TSHttpTxnHookAdd(txn, TS_HTTP_RESPONSE_TRANSFORM_HOOK, connection);
  }
  TSHttpTxnReenable(txn, TS_EVENT_HTTP_CONTINUE);
  return 0;
}

void
TSPluginInit(int argc, const char *argv[])
{
  (void)argc;
  (void)argv;
  TSPluginRegistrationInfo info = {NAME, "pwhost", "pwhost"};
  if (TSPluginRegister(&info) != TS_SUCCESS) {
    TSError("[" NAME "] registration failed");
    return;
  }
  TSHttpHookAdd(TS_HTTP_READ_REQUEST_HDR_HOOK, TSContCreate(on_read_request, NULL));
}
