//! From an event to a row: the route's renames, dropped fields and
//! constants, and the entity the row is (table + key values).

use crate::config::Route;
use crate::event::Event;
use serde_json::{Map, Value};

/// Which row an event is about: its schema-qualified table and its key
/// values as text ([`key_text`]; a composite key's values joined with `,`,
/// each with `\` and `,` escaped by a `\`). Versions and conflicts
/// are kept per entity, and an engine's row locks (the PostgreSQL target) are taken
/// on `table:key`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entity {
    pub table: String,
    pub key: String,
}

/// An event mapped through its route.
#[derive(Debug, Clone, PartialEq)]
pub struct MappedRow {
    pub entity: Entity,
    /// Column → value, as a JSON object (what `jsonb_populate_recordset` reads).
    pub columns: Map<String, Value>,
}

/// A key value as text, the way it is compared: strings as they are,
/// booleans in their JSON form, numbers in their JSON form except that an
/// integral number is written as an integer (`1.0` and `1e0` are `1`, the
/// same row as `1`). The outbox's `entity_key` must use the same form for
/// the sink to see this site's pending writes.
pub fn key_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                Some(format!("{}", f as i64))
            } else {
                Some(n.to_string())
            }
        }
        other => Some(other.to_string()),
    }
}

/// The entity key of key values: one value as it is; several joined with
/// `,`, each escaped so that no two different tuples give the same text.
pub fn join_key(parts: &[String]) -> String {
    if let [one] = parts {
        return one.clone();
    }
    parts
        .iter()
        .map(|p| p.replace('\\', "\\\\").replace(',', "\\,"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Maps an event's data through `route`. The error says what is missing.
pub fn map_row(route: &Route, data: &Map<String, Value>) -> Result<MappedRow, String> {
    let mut columns = Map::with_capacity(data.len() + route.constants.len());
    for (field, value) in data {
        if let Some(column) = route.column_of(field) {
            columns.insert(column.to_string(), value.clone());
        }
    }
    for (column, value) in &route.constants {
        columns.insert(column.clone(), value.clone());
    }
    let mut parts = Vec::with_capacity(route.key.len());
    for column in &route.key {
        match columns.get(column).and_then(key_text) {
            Some(text) => parts.push(text),
            None => {
                let field = route.field_of(column);
                return Err(if field == column {
                    format!("key column `{column}` is missing from the event's data")
                } else {
                    format!(
                        "key column `{column}` (field `{field}`) is missing from the event's data"
                    )
                });
            }
        }
    }
    Ok(MappedRow {
        entity: Entity {
            table: route.entity_table(),
            key: join_key(&parts),
        },
        columns,
    })
}

/// Parses an event's data as an object (events carry one).
pub fn data_object(event: &Event) -> Result<Map<String, Value>, String> {
    match serde_json::from_str::<Value>(event.data.get()) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("the event's data is not a JSON object".into()),
        Err(e) => Err(format!("the event's data is not JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Operation;
    use std::collections::BTreeMap;

    fn route() -> Route {
        Route {
            kind: "user.upsert".into(),
            table: "public.users".into(),
            key: vec!["id".into()],
            operation: Operation::Upsert,
            rename: BTreeMap::from([("username".to_string(), "user_name".to_string())]),
            drop: vec!["password".into()],
            constants: BTreeMap::from([("source".to_string(), Value::from("sitesync"))]),
        }
    }

    fn data(json: &str) -> Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn integral_numbers_are_one_key_and_composite_keys_do_not_collide() {
        assert_eq!(key_text(&serde_json::json!(1.0)).as_deref(), Some("1"));
        assert_eq!(key_text(&serde_json::json!(1)).as_deref(), Some("1"));
        assert_eq!(key_text(&serde_json::json!(1.5)).as_deref(), Some("1.5"));
        assert_eq!(key_text(&serde_json::json!("a,b")).as_deref(), Some("a,b"));
        assert_eq!(join_key(&["a,b".into()]), "a,b");
        let one = join_key(&["a,b".into(), "c".into()]);
        let two = join_key(&["a".into(), "b,c".into()]);
        assert_ne!(one, two);
        assert_eq!(one, "a\\,b,c");
        assert_eq!(join_key(&["a\\".into(), "b".into()]), "a\\\\,b");
    }

    #[test]
    fn renames_drops_and_constants() {
        let row = map_row(
            &route(),
            &data(r#"{"id": 7, "username": "zoe", "password": "x", "email": "z@e"}"#),
        )
        .unwrap();
        assert_eq!(
            row.entity,
            Entity {
                table: "public.users".into(),
                key: "7".into()
            }
        );
        assert_eq!(
            Value::Object(row.columns),
            serde_json::json!({"id": 7, "user_name": "zoe", "email": "z@e", "source": "sitesync"})
        );
    }

    #[test]
    fn composite_and_renamed_keys() {
        let mut r = route();
        r.key = vec!["tenant".into(), "user_name".into()];
        let row = map_row(&r, &data(r#"{"tenant": "t1", "username": "zoe"}"#)).unwrap();
        assert_eq!(row.entity.key, "t1,zoe");
        let err = map_row(&r, &data(r#"{"tenant": "t1"}"#)).unwrap_err();
        assert_eq!(
            err,
            "key column `user_name` (field `username`) is missing from the event's data"
        );
        let err = map_row(&r, &data(r#"{"tenant": null, "username": "z"}"#)).unwrap_err();
        assert!(err.contains("`tenant`"), "{err}");
    }
}
