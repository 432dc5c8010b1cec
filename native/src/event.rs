//! A parsed record checked against the event models' rules (producer/events.py), and the
//! payload the ledger stores: the fields the record set, as the reference decoder keeps them
//! (producer/ledger_event.py). Anything not certainly valid in the plain shape producers write
//! is `None`, for the reference decoder to decide with its rejection reasons.

use std::borrow::Cow;

use crate::json::Value;
use crate::time::Timestamp;

/// The field names of each model, from Python (the models are the contract), and the bounds.
pub struct Fields {
    pub started: Vec<String>,
    pub finalized: Vec<String>,
    pub appended: Vec<String>,
    pub usage: Vec<String>,
    pub call: Vec<String>,
    pub legacy: Vec<String>,
    pub entry: Vec<String>,
    /// USAGE_MEASURES: the legacy token_usage's required counts, in the models' order.
    pub measures: Vec<String>,
    /// TOKEN_KINDS: a call's optional counts, summed per model where reported.
    pub kinds: Vec<String>,
    pub max: i64,
    /// A call's counts are at most max / calls, and at most `calls` calls are taken: their sums
    /// are then within max without a pass over them.
    pub calls: usize,
}

/// The fields each type's rules below read: tests/unit/consumer/ledger/test_native.py holds them to
/// the models', so that a field added to a model cannot be dropped from the payload here.
pub const KNOWN: &[(&str, &[&str])] = &[
    (
        "turn.started",
        &["turn_id", "user_query", "mentioned_documents"],
    ),
    ("turn.finalized", &["turn_id", "content", "usage"]),
    (
        "message.appended",
        &["turn_id", "role", "content", "token_usage"],
    ),
    (
        "envelope",
        &[
            "event_id",
            "schema_version",
            "occurred_at",
            "thread_id",
            "search_space_id",
            "user_id",
            "type",
        ],
    ),
    ("usage", &["calls"]),
    (
        "call",
        &[
            "model",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "cost_micros",
            "call_kind",
            "cached_tokens",
            "reasoning_tokens",
        ],
    ),
    (
        "legacy",
        &[
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "cost_micros",
            "usage",
            "call_details",
        ],
    ),
    (
        "entry",
        &[
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "cost_micros",
        ],
    ),
];

/// A valid event: its envelope, and its payload (turn_id and role are read from it).
pub struct Event<'a> {
    pub kind: &'static str,
    pub event_id: u128,
    pub occurred_at: Timestamp,
    pub thread_id: i64,
    pub search_space_id: i64,
    pub user_id: Option<u128>,
    /// Fields of the record (and of its nested usage) that no model has.
    pub unknown: usize,
    /// The payload: the record's parts, then the envelope's (the reference's dict, in another
    /// order, which jsonb does not keep).
    pub payload: Value<'a>,
}

pub type Entries<'a> = Vec<(Cow<'a, str>, Value<'a>)>;

/// Moves a field's value out, leaving its key (and a null) behind: the unknown fields are
/// counted after, over every key the record had.
fn take<'a>(entries: &mut Entries<'a>, name: &str) -> Option<Value<'a>> {
    let at = entries.iter().position(|(key, _)| key == name)?;
    Some(std::mem::replace(&mut entries[at].1, Value::Null))
}

pub fn get<'b, 'a>(entries: &'b [(Cow<'a, str>, Value<'a>)], name: &str) -> Option<&'b Value<'a>> {
    entries
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value)
}

fn unknown_in(entries: &Entries<'_>, fields: &[String]) -> usize {
    entries
        .iter()
        .filter(|(key, _)| !fields.iter().any(|field| field == key))
        .count()
}

fn int_within(value: &Value<'_>, low: i64, high: i64) -> Option<i64> {
    match *value {
        Value::Int(number) if (low..=high).contains(&number) => Some(number),
        _ => None,
    }
}

/// Optional with a default of None: absent or null, else within the bounds.
fn optional_int_ok(entries: &Entries<'_>, name: &str, high: i64) -> bool {
    match get(entries, name) {
        None | Some(Value::Null) => true,
        Some(value) => int_within(value, 0, high).is_some(),
    }
}

fn text_within(value: &Value<'_>, low: usize, high: usize) -> bool {
    value
        .as_str()
        .is_some_and(|text| (low..=high).contains(&text.chars().count()))
}

fn turn_id_ok(value: &Value<'_>) -> bool {
    text_within(value, 1, 64)
}

/// The hyphenated form, either case; other forms are the reference decoder's.
pub fn parse_uuid(text: &str) -> Option<u128> {
    let bytes = text.as_bytes();
    if bytes.len() != 36 {
        return None;
    }
    let mut value = 0u128;
    for (at, &byte) in bytes.iter().enumerate() {
        if matches!(at, 8 | 13 | 18 | 23) {
            if byte != b'-' {
                return None;
            }
            continue;
        }
        value = (value << 4) | (byte as char).to_digit(16)? as u128;
    }
    Some(value)
}

/// A list of objects each with a string "type" (content parts).
fn content_ok(value: &Value<'_>) -> bool {
    match value {
        Value::Array(parts) => parts.iter().all(|part| match part {
            Value::Object(entries) => {
                get(entries, "type").is_some_and(|kind| kind.as_str().is_some())
            }
            _ => false,
        }),
        _ => false,
    }
}

fn objects(value: &Value<'_>) -> bool {
    matches!(value, Value::Array(items) if items.iter().all(|item| matches!(item, Value::Object(_))))
}

fn str_entry<'a>(name: &'static str, value: Value<'a>) -> (Cow<'a, str>, Value<'a>) {
    (Cow::Borrowed(name), value)
}

pub fn decode<'a>(document: Value<'a>, fields: &Fields) -> Option<Event<'a>> {
    let Value::Object(mut entries) = document else {
        return None;
    };
    let kind = match get(&entries, "type")?.as_str()? {
        "turn.started" => "turn.started",
        "turn.finalized" => "turn.finalized",
        "message.appended" => "message.appended",
        _ => return None,
    };
    let event_id = parse_uuid(get(&entries, "event_id")?.as_str()?)?;
    if *get(&entries, "schema_version")? != Value::Int(1) {
        return None;
    }
    let occurred_at = Timestamp::parse(get(&entries, "occurred_at")?.as_str()?)?;
    let thread_id = int_within(get(&entries, "thread_id")?, 1, fields.max)?;
    let search_space_id = int_within(get(&entries, "search_space_id")?, 1, fields.max)?;
    let user_id = match get(&entries, "user_id")? {
        Value::Null => None,
        value => Some(parse_uuid(value.as_str()?)?),
    };
    let (mut payload, unknown) = match kind {
        "turn.started" => (
            started(&mut entries)?,
            unknown_in(&entries, &fields.started),
        ),
        "turn.finalized" => {
            let (payload, nested) = finalized(&mut entries, user_id.is_some(), fields)?;
            (payload, nested + unknown_in(&entries, &fields.finalized))
        }
        _ => {
            let (payload, nested) = appended(&mut entries, fields)?;
            (payload, nested + unknown_in(&entries, &fields.appended))
        }
    };
    payload.push(str_entry("event_id", Value::Uuid(event_id)));
    payload.push(str_entry("schema_version", Value::Int(1)));
    payload.push(str_entry(
        "occurred_at",
        Value::Str(Cow::Owned(occurred_at.isoformat())),
    ));
    payload.push(str_entry("thread_id", Value::Int(thread_id)));
    payload.push(str_entry("search_space_id", Value::Int(search_space_id)));
    payload.push(str_entry(
        "user_id",
        user_id.map_or(Value::Null, Value::Uuid),
    ));
    payload.push(str_entry("type", Value::Str(Cow::Borrowed(kind))));
    Some(Event {
        kind,
        event_id,
        occurred_at,
        thread_id,
        search_space_id,
        user_id,
        unknown,
        payload: Value::Object(payload),
    })
}

fn started<'a>(entries: &mut Entries<'a>) -> Option<Entries<'a>> {
    let turn_id = take(entries, "turn_id")?;
    let user_query = take(entries, "user_query")?;
    if !turn_id_ok(&turn_id) || user_query.as_str().is_none() {
        return None;
    }
    let mut payload = vec![
        str_entry("turn_id", turn_id),
        str_entry("user_query", user_query),
    ];
    if let Some(documents) = take(entries, "mentioned_documents") {
        if !objects(&documents) {
            return None;
        }
        payload.push(str_entry("mentioned_documents", documents));
    }
    Some(payload)
}

fn finalized<'a>(
    entries: &mut Entries<'a>,
    has_user: bool,
    fields: &Fields,
) -> Option<(Entries<'a>, usize)> {
    let turn_id = take(entries, "turn_id")?;
    let content = take(entries, "content")?;
    if !turn_id_ok(&turn_id) || !content_ok(&content) {
        return None;
    }
    let mut payload = vec![str_entry("turn_id", turn_id), str_entry("content", content)];
    let mut unknown = 0;
    match take(entries, "usage") {
        None => {}
        Some(Value::Null) => payload.push(str_entry("usage", Value::Null)),
        Some(Value::Object(mut usage)) => {
            let calls = take(&mut usage, "calls")?;
            let Value::Array(items) = &calls else {
                return None;
            };
            if (!items.is_empty() && !has_user) || items.len() > fields.calls {
                return None; // calls need a user to bill; many calls need their sums checked
            }
            let high = fields.max / fields.calls as i64;
            for item in items {
                let Value::Object(call) = item else {
                    return None;
                };
                if !call_ok(call, &fields.measures, high) {
                    return None;
                }
                unknown += unknown_in(call, &fields.call);
            }
            unknown += unknown_in(&usage, &fields.usage);
            payload.push(str_entry(
                "usage",
                Value::Object(vec![str_entry("calls", calls)]),
            ));
        }
        Some(_) => return None,
    }
    Some((payload, unknown))
}

fn call_ok(call: &Entries<'_>, measures: &[String], high: i64) -> bool {
    get(call, "model").is_some_and(|model| text_within(model, 1, 200))
        && get(call, "call_kind").is_some_and(|kind| text_within(kind, 1, 64))
        && measures
            .iter()
            .all(|name| get(call, name).is_some_and(|count| int_within(count, 0, high).is_some()))
        && optional_int_ok(call, "cached_tokens", high)
        && optional_int_ok(call, "reasoning_tokens", high)
}

fn appended<'a>(entries: &mut Entries<'a>, fields: &Fields) -> Option<(Entries<'a>, usize)> {
    let role = match take(entries, "role")?.as_str()? {
        "user" => "user",
        "assistant" => "assistant",
        "system" => "system",
        _ => return None,
    };
    let content = take(entries, "content")?;
    if !content_ok(&content) {
        return None;
    }
    let mut payload = vec![
        str_entry("role", Value::Str(Cow::Borrowed(role))),
        str_entry("content", content),
    ];
    match take(entries, "turn_id") {
        None => {}
        Some(Value::Null) => payload.push(str_entry("turn_id", Value::Null)),
        Some(turn_id) if turn_id_ok(&turn_id) => payload.push(str_entry("turn_id", turn_id)),
        Some(_) => return None,
    }
    let mut unknown = 0;
    match take(entries, "token_usage") {
        None => {}
        Some(Value::Null) => payload.push(str_entry("token_usage", Value::Null)),
        Some(Value::Object(mut sent)) => {
            if role != "assistant" {
                return None; // token_usage on a user or system message: a rejection
            }
            let mut kept: Entries<'a> = Vec::with_capacity(6);
            for name in &fields.measures {
                let count = take(&mut sent, name)?;
                int_within(&count, 0, fields.max)?;
                kept.push((Cow::Owned(name.clone()), count));
            }
            let usage = take(&mut sent, "usage");
            let call_details = take(&mut sent, "call_details");
            unknown += unknown_in(&sent, &fields.legacy);
            if let Some(usage) = usage {
                match &usage {
                    Value::Null => {}
                    Value::Object(models) => {
                        for (_, entry) in models {
                            let Value::Object(entry) = entry else {
                                return None;
                            };
                            if !fields
                                .entry
                                .iter()
                                .all(|name| optional_int_ok(entry, name, fields.max))
                            {
                                return None;
                            }
                            unknown += unknown_in(entry, &fields.entry);
                        }
                    }
                    _ => return None,
                }
                kept.push(str_entry("usage", usage));
            }
            if let Some(details) = call_details {
                if !matches!(details, Value::Null | Value::Object(_)) && !objects(&details) {
                    return None;
                }
                kept.push(str_entry("call_details", details));
            }
            payload.push(str_entry("token_usage", Value::Object(kept)));
        }
        Some(_) => return None,
    }
    Some((payload, unknown))
}
