//! Envoy's CEL foreign functions, with the `cel` crate: `expr_create` compiles an expression
//! (the argument's text) and returns its token (4 little-endian bytes), `expr_evaluate`
//! evaluates it over the attributes of the plugin's context and returns the value encoded as
//! `proxy_get_property` encodes values, `expr_delete` forgets it. Tokens belong to the VM's root
//! context, as in Envoy.
//!
//! Expressions see the attribute groups (`request`, `response`, `connection`, `source`,
//! `destination`, `upstream`, `xds`) as maps of the attributes found, `filter_state` as a map of
//! the stream's objects by key, `plugin_name`, `plugin_root_id`, `plugin_vm_id`,
//! `connection_id`, and any other name as the property the plugin set under it. Envoy hands
//! protobuf messages (`xds.node`, `metadata`) to CEL as messages; here the node is a map of its
//! id, cluster and metadata.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use rustc_hash::FxHashMap;

use super::ForeignCall;
use crate::state::Limit;
use crate::value::{timestamp_nanos, Value};
use crate::{attributes, SharedState, Status};

/// The parser and the evaluator recurse over an expression's nesting (a chain of `+` is as deep
/// as it is long), so a plugin must not be able to hand over one deep enough to exhaust a
/// worker's stack: sources are at most this long (the parser's recursion stays within about
/// a quarter of a 1 MiB stack, measured), ...
const MAX_SOURCE_BYTES: usize = 1024;
/// ... their brackets nest at most this deep, ...
const MAX_NESTING: usize = 32;
/// ... and the compiled expression is at most this deep (the evaluator's recursion).
const MAX_DEPTH: usize = 64;
/// Comprehensions (`all`, `exists`, `exists_one`, `map`, `filter`) are refused, as Envoy's own
/// CEL filters refuse them: an evaluation runs in a host function, out of reach of the engine's
/// deadline, and a comprehension multiplies the work (and, with `map`, the memory) of what it
/// runs for every element. Even one level over a list of a 1 KiB source, running a chain of
/// `+` over a large value, built gigabytes.
const MAX_COMPREHENSION_NESTING: usize = 0;
/// A string or bytes value an expression reads (an attribute, or a property the plugin set) is
/// at most this long: `+` copies its operands, so a chain of them over a value the plugin made
/// as large as it liked would take the proxy's memory (63 copies of a 256 MiB property).
const MAX_VALUE_BYTES: usize = 64 << 10;

/// The most compiled expressions a VM keeps (`expr_create` without `expr_delete` would keep
/// adding to the host's memory, outside the VM's cap).
const MAX_PROGRAMS: usize = 4096;

/// The expressions a VM's root context compiled, by token.
#[derive(Default)]
struct Expressions {
    next_token: u32,
    programs: FxHashMap<u32, Arc<cel::Program>>,
}

pub(super) fn register(shared: &SharedState) {
    shared.register_foreign_function("expr_create", Arc::new(create));
    shared.register_foreign_function("expr_evaluate", Arc::new(evaluate));
    shared.register_foreign_function("expr_delete", Arc::new(delete));
}

/// Whether the expression's brackets (outside string literals) nest deeper than
/// [`MAX_NESTING`].
fn too_deep(source: &str) -> bool {
    let mut depth = 0usize;
    let mut quote = None;
    let mut escaped = false;
    for byte in source.bytes() {
        if let Some(open) = quote {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                _ if byte == open => quote = None,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' | b'\'' => quote = Some(byte),
            b'(' | b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING {
                    return true;
                }
            }
            b')' | b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// `expr_create(source)`: the token of the compiled expression; `BAD_ARGUMENT` for one that
/// does not compile.
fn create(call: &mut ForeignCall<'_>, args: &[u8]) -> Result<Vec<u8>, Status> {
    let source = std::str::from_utf8(args).map_err(|_| Status::BadArgument)?;
    let too_large = || {
        format!(
            "expr_create: a CEL expression has at most {MAX_SOURCE_BYTES} bytes, brackets \
             nested at most {MAX_NESTING} deep and at most {MAX_DEPTH} levels: BAD_ARGUMENT"
        )
    };
    if source.len() > MAX_SOURCE_BYTES || too_deep(source) {
        call.state.tell_limit(Limit::ExpressionSize, too_large);
        return Err(Status::BadArgument);
    }
    let program = cel::Program::compile(source).map_err(|_| Status::BadArgument)?;
    let (depth, comprehensions) = shape(program.expression());
    if depth > MAX_DEPTH {
        call.state.tell_limit(Limit::ExpressionSize, too_large);
        return Err(Status::BadArgument);
    }
    if comprehensions > MAX_COMPREHENSION_NESTING {
        call.state.tell_limit(Limit::ExpressionComprehension, || {
            "expr_create: CEL comprehensions (all, exists, exists_one, map, filter) are \
             refused, as in Envoy's CEL filters: BAD_ARGUMENT"
                .to_string()
        });
        return Err(Status::BadArgument);
    }
    if call.vm_data::<Expressions>().programs.len() >= MAX_PROGRAMS {
        call.state.tell_limit(Limit::ExpressionCount, || {
            format!(
                "expr_create: a VM keeps at most {MAX_PROGRAMS} CEL expressions (expr_delete \
                 frees one): INTERNAL_FAILURE"
            )
        });
        return Err(Status::InternalFailure);
    }
    let expressions = call.vm_data::<Expressions>();
    let mut token = expressions.next_token;
    while expressions.programs.contains_key(&token) {
        token = token.wrapping_add(1);
    }
    expressions.next_token = token.wrapping_add(1);
    expressions.programs.insert(token, Arc::new(program));
    Ok(token.to_le_bytes().to_vec())
}

/// How deep an expression's tree is, and how deep comprehensions nest in it, measured without
/// recursion.
fn shape(root: &cel::IdedExpr) -> (usize, usize) {
    use cel::common::ast::{EntryExpr, Expr};
    let (mut deepest, mut comprehensions) = (0, 0);
    let mut pending: Vec<(&cel::IdedExpr, usize, usize)> = vec![(root, 1, 0)];
    while let Some((node, level, nesting)) = pending.pop() {
        deepest = deepest.max(level);
        comprehensions = comprehensions.max(nesting);
        let mut children: Vec<&cel::IdedExpr> = Vec::new();
        let mut inner = nesting;
        match &node.expr {
            Expr::Call(call) => {
                children.extend(call.target.as_deref());
                children.extend(&call.args);
            }
            Expr::Comprehension(c) => {
                inner += 1;
                children.extend([
                    &c.iter_range,
                    &c.accu_init,
                    &c.loop_cond,
                    &c.loop_step,
                    &c.result,
                ])
            }
            Expr::List(list) => children.extend(&list.elements),
            Expr::Map(cel::common::ast::MapExpr { entries })
            | Expr::Struct(cel::common::ast::StructExpr { entries, .. }) => {
                for entry in entries {
                    match &entry.expr {
                        EntryExpr::MapEntry(e) => children.extend([&e.key, &e.value]),
                        EntryExpr::StructField(f) => children.push(&f.value),
                    }
                }
            }
            Expr::Select(select) => children.push(&select.operand),
            Expr::Ident(_) | Expr::Literal(_) | Expr::Unspecified => {}
        }
        pending.extend(children.into_iter().map(|child| (child, level + 1, inner)));
    }
    (deepest, comprehensions)
}

fn token(args: &[u8]) -> Result<u32, Status> {
    let bytes: [u8; 4] = args.try_into().map_err(|_| Status::BadArgument)?;
    Ok(u32::from_le_bytes(bytes))
}

/// `expr_evaluate(token)`: the value, or `NOT_FOUND` for an unknown token, `INTERNAL_FAILURE`
/// for an evaluation error (e.g. a missing attribute), `SERIALIZATION_FAILURE` for a value
/// that cannot be handed over (null).
fn evaluate(call: &mut ForeignCall<'_>, args: &[u8]) -> Result<Vec<u8>, Status> {
    let token = token(args)?;
    let program = call
        .vm_data::<Expressions>()
        .programs
        .get(&token)
        .cloned()
        .ok_or(Status::NotFound)?;
    let mut context = cel::Context::default();
    let mut left_out = false;
    for name in program.references().variables() {
        if let Some(value) = variable(call, name) {
            let Some(value) = without_large_values(value, &mut left_out) else {
                tell_value_left_out(call);
                return Err(Status::InternalFailure);
            };
            context.add_variable_from_value(name, to_cel(value));
        }
    }
    let result = program.execute(&context).map_err(|_| {
        if left_out {
            tell_value_left_out(call);
        }
        Status::InternalFailure
    })?;
    from_cel(&result)?.encode()
}

/// Tells the plugin that its evaluation failed, reading a value too large to read or a map
/// one was left out of (which may be why).
fn tell_value_left_out(call: &mut ForeignCall<'_>) {
    call.state.tell_limit(Limit::ExpressionValue, || {
        format!(
            "expr_evaluate: a CEL expression failed (INTERNAL_FAILURE) reading a value, or a \
             map, that had a string or bytes value over {} KiB: such values are left out of \
             what expressions read, and reading one fails",
            MAX_VALUE_BYTES >> 10
        )
    });
}

/// `value` with every map entry holding a string or bytes longer than [`MAX_VALUE_BYTES`]
/// left out (an expression reading one finds no such key, and its evaluation fails; one reading
/// the rest of the map is not refused for a large cookie elsewhere in it); `None` if `value`
/// itself is such a string or bytes, or a list holding one. Sets `left_out` if an entry was
/// left out.
fn without_large_values(value: Value<'static>, left_out: &mut bool) -> Option<Value<'static>> {
    match value {
        Value::String(ref bytes) | Value::Bytes(ref bytes) | Value::Message(ref bytes)
            if bytes.len() > MAX_VALUE_BYTES =>
        {
            None
        }
        Value::Map(entries) => {
            let count = entries.len();
            let kept: Vec<_> = entries
                .into_iter()
                .filter(|(key, _)| key.len() <= MAX_VALUE_BYTES)
                .filter_map(|(key, value)| Some((key, without_large_values(value, left_out)?)))
                .collect();
            *left_out |= kept.len() < count;
            Some(Value::Map(kept))
        }
        Value::List(items) => items
            .into_iter()
            .map(|item| without_large_values(item, left_out))
            .collect::<Option<Vec<_>>>()
            .map(Value::List),
        other => Some(other),
    }
}

/// `expr_delete(token)`: always `OK` for a well-formed token, known or not.
fn delete(call: &mut ForeignCall<'_>, args: &[u8]) -> Result<Vec<u8>, Status> {
    let token = token(args)?;
    call.vm_data::<Expressions>().programs.remove(&token);
    Ok(Vec::new())
}

/// The value of a top-level name an expression uses.
fn variable(call: &mut ForeignCall<'_>, name: &str) -> Option<Value<'static>> {
    let groups = attributes::GROUPS.iter().map(|(group, _)| *group);
    if name == "filter_state" || groups.clone().any(|group| group == name) {
        return attributes::group_value(call.state, name);
    }
    // What the embedder answers itself comes first, as for `proxy_get_property`.
    let context = call.state.effective_context;
    let path = crate::PropertyPath(name.as_bytes());
    if let Some(bytes) = call.state.host.property(context, path) {
        return Some(Value::Bytes(Cow::Owned(bytes.into_owned())));
    }
    attributes::property(call.state, path).ok()
}

fn to_cel(value: Value<'static>) -> cel::Value {
    match value {
        Value::String(s) => cel::Value::String(Arc::new(String::from_utf8_lossy(&s).into_owned())),
        Value::Bytes(b) | Value::Message(b) => cel::Value::Bytes(Arc::new(b.into_owned())),
        Value::Int(i) => cel::Value::Int(i),
        Value::Uint(u) => cel::Value::UInt(u),
        Value::Double(d) => cel::Value::Float(d),
        Value::Bool(b) => cel::Value::Bool(b),
        Value::Timestamp(t) => {
            let nanos = timestamp_nanos(t);
            chrono::DateTime::from_timestamp_nanos(nanos)
                .fixed_offset()
                .into()
        }
        Value::Duration(d) => {
            cel::Value::Duration(chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX))
        }
        Value::Map(entries) => {
            let map: HashMap<String, cel::Value> = entries
                .into_iter()
                .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), to_cel(v)))
                .collect();
            map.into()
        }
        Value::List(items) => cel::Value::List(Arc::new(items.into_iter().map(to_cel).collect())),
        Value::Null => cel::Value::Null,
    }
}

fn from_cel(value: &cel::Value) -> Result<Value<'static>, Status> {
    Ok(match value {
        cel::Value::String(s) => Value::string(s.as_str()),
        cel::Value::Bytes(b) => Value::Bytes(Cow::Owned(b.to_vec())),
        cel::Value::Int(i) => Value::Int(*i),
        cel::Value::UInt(u) => Value::Uint(*u),
        cel::Value::Float(f) => Value::Double(*f),
        cel::Value::Bool(b) => Value::Bool(*b),
        cel::Value::Timestamp(t) => {
            let nanos = t.timestamp_nanos_opt().unwrap_or(i64::MAX);
            let time = if nanos >= 0 {
                UNIX_EPOCH + Duration::from_nanos(nanos as u64)
            } else {
                UNIX_EPOCH - Duration::from_nanos(nanos.unsigned_abs())
            };
            Value::Timestamp(time)
        }
        cel::Value::Duration(d) => Value::Duration(d.to_std().unwrap_or_default()),
        cel::Value::List(items) => {
            Value::List(items.iter().map(from_cel).collect::<Result<_, Status>>()?)
        }
        cel::Value::Map(map) => {
            let mut entries = map
                .map
                .iter()
                .map(|(k, v)| Ok((Cow::<[u8]>::Owned(key_bytes(k)), from_cel(v)?)))
                .collect::<Result<Vec<_>, Status>>()?;
            // A CEL map has no order; sort so that the same map always encodes the same.
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Map(entries)
        }
        _ => return Err(Status::SerializationFailure),
    })
}

/// A map key encoded as Envoy encodes any value.
fn key_bytes(key: &cel::objects::Key) -> Vec<u8> {
    match key {
        cel::objects::Key::String(s) => s.as_bytes().to_vec(),
        cel::objects::Key::Int(i) => i.to_le_bytes().to_vec(),
        cel::objects::Key::Uint(u) => u.to_le_bytes().to_vec(),
        cel::objects::Key::Bool(b) => vec![u8::from(*b)],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worst expressions the limits let through compile on a thread with a small stack (a
    /// proxy's worker threads have 2 MiB or less), and those shallow enough to keep evaluate
    /// there too; deeper ones are refused after compiling.
    #[test]
    fn the_largest_expressions_allowed_do_not_exhaust_a_small_stack() {
        let chain = |first: &str, op: &str| {
            format!(
                "{first}{}",
                op.repeat((MAX_SOURCE_BYTES - first.len()) / op.len())
            )
        };
        let nested = format!("{}1{}", "(".repeat(MAX_NESTING), ")".repeat(MAX_NESTING));
        let shallow = format!("1{}", "+1".repeat(MAX_DEPTH - 2));
        for (source, evaluates) in [
            (chain("1", "+1"), false),
            (chain("1", "==1"), false),
            // The parser balances chains of `&&` and `||`.
            (chain("true", "&&true"), true),
            (nested, true),
            (shallow, true),
        ] {
            assert!(source.len() <= MAX_SOURCE_BYTES && !too_deep(&source));
            let result = std::thread::Builder::new()
                .stack_size(1 << 20)
                .spawn(move || {
                    let Ok(program) = cel::Program::compile(&source) else {
                        return Ok(false);
                    };
                    if shape(program.expression()).0 > MAX_DEPTH {
                        return Ok(false);
                    }
                    program
                        .execute(&cel::Context::default())
                        .map(|_| true)
                        .map_err(|e| e.to_string())
                })
                .unwrap()
                .join();
            assert!(
                matches!(result, Ok(Ok(e)) if e == evaluates),
                "{result:?} for an expression of {evaluates}"
            );
        }
    }

    #[test]
    fn nesting_is_counted_over_every_kind_of_bracket_outside_strings() {
        assert!(!too_deep(&"(".repeat(MAX_NESTING)));
        assert!(too_deep(&"([{".repeat(MAX_NESTING)));
        assert!(!too_deep(&"()".repeat(1000)));
        let quoted = format!("'{}' + \"{}\"", "(".repeat(100), "[".repeat(100));
        assert!(!too_deep(&quoted));
        assert!(!too_deep(r"'it\'s (((' + 'x'"));
    }

    /// A comprehension multiplies the work (and memory) of what it runs per element past any
    /// deadline, so none is accepted; the rest of the language is.
    #[test]
    fn comprehensions_are_refused() {
        let nested = |levels: usize| {
            let mut source = "true".to_string();
            for level in 0..levels {
                source = format!("[0,1,2,3,4,5,6,7,8,9].all(v{level}, {source})");
            }
            cel::Program::compile(&source).unwrap()
        };
        let comprehensions = |program: cel::Program| shape(program.expression()).1;
        assert_eq!(comprehensions(nested(0)), 0);
        assert_eq!(comprehensions(nested(1)), 1);
        assert_eq!(comprehensions(nested(2)), 2);
        for source in [
            "[1].exists(x, x > 0)",
            "[1].map(x, x + 1)",
            "[1].filter(x, x > 0)",
        ] {
            let program = cel::Program::compile(source).unwrap();
            assert_eq!(comprehensions(program), 1, "{source}");
        }
        let plain = cel::Program::compile("size('abc') + 1 == 4 && 'a' in {'a': 1}").unwrap();
        assert_eq!(comprehensions(plain), 0);
    }

    #[test]
    fn values_over_64_kib_are_left_out_of_what_an_expression_reads() {
        let big = || Cow::Owned(vec![b'x'; MAX_VALUE_BYTES + 1]);
        let fits = || Cow::Owned(vec![b'x'; MAX_VALUE_BYTES]);
        let mut left_out = false;
        assert!(without_large_values(Value::Bytes(fits()), &mut left_out).is_some());
        assert!(without_large_values(Value::Bytes(big()), &mut left_out).is_none());
        assert!(without_large_values(Value::String(big()), &mut left_out).is_none());
        let list = Value::List(vec![Value::Int(1), Value::Bytes(big())]);
        assert!(without_large_values(list, &mut left_out).is_none());
        let small = Value::Map(vec![(Cow::Borrowed(&b"path"[..]), Value::str("/"))]);
        assert!(without_large_values(small, &mut left_out).is_some());
        assert!(!left_out, "nothing was left out of a map yet");
        // A map keeps its other entries: `path` stays readable beside a huge cookie.
        let headers = Value::Map(vec![
            (Cow::Borrowed(&b"cookie"[..]), Value::String(big())),
            (Cow::Borrowed(&b"path"[..]), Value::str("/")),
            (big(), Value::Int(1)),
        ]);
        assert_eq!(
            without_large_values(headers, &mut left_out),
            Some(Value::Map(vec![(
                Cow::Borrowed(&b"path"[..]),
                Value::str("/")
            )]))
        );
        assert!(left_out);
    }
}
