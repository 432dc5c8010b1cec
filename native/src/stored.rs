//! What a valid event's rows store, from its payload: the content of the message it writes, as
//! JSON text, and its usage (the four totals, the breakdown by model, the call details as JSON
//! text). producer/ledger_event.py's `stored_content` and `stored_usage` are the rules;
//! tests/unit/consumer/ledger/test_native.py holds this to them on every generated event.

use crate::canonical::{write, write_str, Form};
use crate::event::{get, Event, Fields};
use crate::json::Value;

/// The content of a turn.finalized that has none: a status part, so the message reads as one.
const NO_TEXT: &[u8] = br#"[{"type":"status","text":"(no text response)"}]"#;

/// A turn.started's mentioned documents keep these fields, and only when all three are set.
const DOCUMENT_FIELDS: [&str; 3] = ["id", "title", "document_type"];

pub struct Usage<'e, 'a> {
    /// USAGE_MEASURES, in their order.
    pub totals: Vec<i64>,
    pub breakdown: Breakdown<'e, 'a>,
    pub call_details: Vec<u8>,
}

pub enum Breakdown<'e, 'a> {
    /// A turn's: each model's sums over its calls, models in the order they first appear; a
    /// token kind only where a call reported it (absent is not zero).
    Summed(Vec<(&'e str, Vec<(&'e str, i64)>)>),
    /// A legacy message's, as sent (None: an empty object).
    Sent(Option<&'e Value<'a>>),
}

fn entries<'e, 'a>(event: &'e Event<'a>) -> &'e [(std::borrow::Cow<'a, str>, Value<'a>)] {
    match &event.payload {
        Value::Object(entries) => entries,
        _ => &[],
    }
}

/// The JSON text of the content the event's message stores (a turn.started's: its user's).
pub fn content(event: &Event<'_>) -> Option<Vec<u8>> {
    let payload = entries(event);
    let mut text = Vec::with_capacity(256);
    match event.kind {
        "turn.started" => {
            text.extend_from_slice(br#"[{"type":"text","text":"#);
            write_str(
                get(payload, "user_query")?.as_str()?,
                Form::Stored,
                &mut text,
            );
            text.push(b'}');
            if let Some(Value::Array(documents)) = get(payload, "mentioned_documents") {
                mentioned_documents(documents, &mut text)?;
            }
            text.push(b']');
        }
        _ => match get(payload, "content")? {
            Value::Array(parts) if parts.is_empty() && event.kind == "turn.finalized" => {
                text.extend_from_slice(NO_TEXT)
            }
            content => write(content, Form::Stored, &mut text),
        },
    }
    Some(text)
}

/// `,{"type":"mentioned-documents","documents":[...]}` when a document has all of its fields.
fn mentioned_documents(documents: &[Value<'_>], text: &mut Vec<u8>) -> Option<()> {
    let mut kept = 0;
    for document in documents {
        let Value::Object(document) = document else {
            return None;
        };
        let values = DOCUMENT_FIELDS.map(|name| get(document, name));
        if values
            .iter()
            .any(|value| matches!(value, None | Some(Value::Null)))
        {
            continue;
        }
        let opening: &[u8] = if kept == 0 {
            br#",{"type":"mentioned-documents","documents":[{"#
        } else {
            b",{"
        };
        text.extend_from_slice(opening);
        for (at, (name, value)) in DOCUMENT_FIELDS.iter().zip(values).enumerate() {
            if at > 0 {
                text.push(b',');
            }
            write_str(name, Form::Stored, text);
            text.push(b':');
            write(value?, Form::Stored, text);
        }
        text.push(b'}');
        kept += 1;
    }
    if kept > 0 {
        text.extend_from_slice(b"]}");
    }
    Some(())
}

/// The usage row the event claims, if any: a turn.finalized's with calls, a message.appended's
/// with token_usage. None also for a sum past i64 (the decoder's bounds exclude one).
pub fn usage<'e, 'a>(event: &'e Event<'a>, fields: &'e Fields) -> Option<Option<Usage<'e, 'a>>> {
    let payload = entries(event);
    match event.kind {
        "turn.finalized" => {
            let Some(Value::Object(usage)) = get(payload, "usage") else {
                return Some(None);
            };
            match get(usage, "calls") {
                Some(Value::Array(calls)) if !calls.is_empty() => {
                    turn_usage(calls, fields).map(Some)
                }
                _ => Some(None),
            }
        }
        "message.appended" => match get(payload, "token_usage") {
            Some(Value::Object(legacy)) => legacy_usage(legacy, fields).map(Some),
            _ => Some(None),
        },
        _ => Some(None),
    }
}

fn turn_usage<'e, 'a>(calls: &'e [Value<'a>], fields: &'e Fields) -> Option<Usage<'e, 'a>> {
    let mut totals = vec![0i64; fields.measures.len()];
    let mut models: Vec<(&'e str, Vec<(&'e str, i64)>)> = Vec::new();
    for call in calls {
        let Value::Object(call) = call else {
            return None;
        };
        let model = get(call, "model")?.as_str()?;
        let at = match models.iter().position(|(name, _)| *name == model) {
            Some(at) => at,
            None => {
                let sums = fields
                    .measures
                    .iter()
                    .map(|name| (name.as_str(), 0))
                    .collect();
                models.push((model, sums));
                models.len() - 1
            }
        };
        let sums = &mut models[at].1;
        for (total, name) in totals.iter_mut().zip(&fields.measures) {
            let Value::Int(count) = get(call, name)? else {
                return None;
            };
            *total = total.checked_add(*count)?;
            add(sums, name, *count)?;
        }
        for kind in &fields.kinds {
            match get(call, kind) {
                None | Some(Value::Null) => {}
                Some(Value::Int(count)) => add(sums, kind, *count)?,
                Some(_) => return None,
            }
        }
    }
    let mut call_details = Vec::with_capacity(512);
    call_details.extend_from_slice(br#"{"calls":["#);
    for (at, call) in calls.iter().enumerate() {
        if at > 0 {
            call_details.push(b',');
        }
        write(call, Form::Stored, &mut call_details);
    }
    call_details.extend_from_slice(b"]}");
    Some(Usage {
        totals,
        breakdown: Breakdown::Summed(models),
        call_details,
    })
}

fn add<'e>(sums: &mut Vec<(&'e str, i64)>, name: &'e str, count: i64) -> Option<()> {
    match sums.iter_mut().find(|(known, _)| *known == name) {
        Some((_, sum)) => *sum = sum.checked_add(count)?,
        None => sums.push((name, count)),
    }
    Some(())
}

fn legacy_usage<'e, 'a>(
    legacy: &'e [(std::borrow::Cow<'a, str>, Value<'a>)],
    fields: &'e Fields,
) -> Option<Usage<'e, 'a>> {
    let totals = fields
        .measures
        .iter()
        .map(|name| match get(legacy, name) {
            Some(Value::Int(count)) => Some(*count),
            _ => None,
        })
        .collect::<Option<Vec<i64>>>()?;
    let breakdown = match get(legacy, "usage") {
        Some(Value::Object(models)) if !models.is_empty() => get(legacy, "usage"),
        _ => None,
    };
    let mut call_details = Vec::with_capacity(256);
    match get(legacy, "call_details") {
        None | Some(Value::Null) => call_details.extend_from_slice(br#"{"calls":[]}"#),
        Some(details @ Value::Array(_)) => {
            call_details.extend_from_slice(br#"{"calls":"#);
            write(details, Form::Stored, &mut call_details);
            call_details.push(b'}');
        }
        Some(details) => write(details, Form::Stored, &mut call_details),
    }
    Some(Usage {
        totals,
        breakdown: Breakdown::Sent(breakdown),
        call_details,
    })
}
