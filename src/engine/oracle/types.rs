//! From LogMiner values to the outbox row's text fields.
//!
//! | Oracle column | `SQL_REDO` form | outbox field |
//! |---|---|---|
//! | NUMBER | `'42'` (LogMiner quotes numbers) or `42` | the digits as written |
//! | VARCHAR2, CHAR, inline CLOB | `'text'` (`''` for a quote) | the text |
//! | NVARCHAR2, NCLOB, non-database-charset text | `UNISTR('\00e9')` | the decoded text |
//! | DATE | `TO_DATE('2026-11-23 16:11:28', 'YYYY-MM-DD HH24:MI:SS')` | `2026-11-23 16:11:28` (read as UTC) |
//! | TIMESTAMP | `TO_TIMESTAMP('2026-11-23 16:11:28.123456')` | `2026-11-23 16:11:28.123456` (read as UTC) |
//! | TIMESTAMP WITH (LOCAL) TIME ZONE | `TO_TIMESTAMP_TZ('2026-11-23 16:11:28.123456 +01:00')` | RFC 3339, `2026-11-23T16:11:28.123456+01:00` |
//! | RAW(16) | `HEXTORAW('7f1d…')` | a UUID, `7f1d8a5e-3c2b-…` (an `id RAW(16)` outbox, `SYS_GUID()`) |
//! | other RAW | `HEXTORAW('…')` | base64 (standard alphabet, padded) |
//! | CLOB written out of row | `EMPTY_CLOB()` then LOB_WRITE operations | refused: the row goes to the dead-letter queue (see the module docs of [`super`]) |

use super::redo::Value;
use base64::Engine;

/// The text an outbox field takes from a column value; `None` is NULL.
pub fn to_text(value: &Value) -> Result<Option<String>, String> {
    Ok(Some(match value {
        Value::Null => return Ok(None),
        Value::Text(t) => t.clone(),
        Value::Number(n) => n.clone(),
        Value::Date(d) => d.format("%Y-%m-%d %H:%M:%S").to_string(),
        Value::Timestamp(t) => t.format("%Y-%m-%d %H:%M:%S%.f").to_string(),
        Value::TimestampTz(t) => t.to_rfc3339(),
        Value::Raw(bytes) => match uuid::Uuid::from_slice(bytes) {
            Ok(id) if bytes.len() == 16 => id.hyphenated().to_string(),
            _ => base64::engine::general_purpose::STANDARD.encode(bytes),
        },
        Value::EmptyLob => {
            return Err(
                "the CLOB was stored out of row (EMPTY_CLOB() then LOB writes), which sitesync does not reassemble: keep outbox payloads under 4,000 bytes, or see docs/engines/oracle.md".into(),
            );
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::oracle::redo::parse_insert;
    use crate::event::parse_timestamp;

    fn one(sql_value: &str) -> Result<Option<String>, String> {
        let ins = parse_insert(&format!(
            "insert into \"S\".\"T\"(\"C\") values ({sql_value});"
        ))
        .map_err(|e| e.to_string())?;
        to_text(&ins.columns[0].1)
    }

    #[test]
    fn every_column_type_as_text() {
        assert_eq!(one("'42'").unwrap().as_deref(), Some("42"));
        assert_eq!(one("-1.5E+3").unwrap().as_deref(), Some("-1.5E+3"));
        assert_eq!(one("'it''s'").unwrap().as_deref(), Some("it's"));
        assert_eq!(one("UNISTR('Zo\\00e9')").unwrap().as_deref(), Some("Zoé"));
        assert_eq!(one("NULL").unwrap(), None);
        let date = one("TO_DATE('2026-11-23 16:11:28', 'YYYY-MM-DD HH24:MI:SS')")
            .unwrap()
            .unwrap();
        assert_eq!(date, "2026-11-23 16:11:28");
        let ts = one("TO_TIMESTAMP('2026-11-23 16:11:28.123456')")
            .unwrap()
            .unwrap();
        assert_eq!(ts, "2026-11-23 16:11:28.123456");
        let tz = one("TO_TIMESTAMP_TZ('2026-11-23 17:11:28.123456 +01:00')")
            .unwrap()
            .unwrap();
        assert_eq!(tz, "2026-11-23T17:11:28.123456+01:00");
        // Every one of them reads back as the event's timestamp would.
        for (text, utc) in [
            (&date, "2026-11-23T16:11:28+00:00"),
            (&ts, "2026-11-23T16:11:28.123456+00:00"),
            (&tz, "2026-11-23T16:11:28.123456+00:00"),
        ] {
            assert_eq!(parse_timestamp(text).unwrap().to_rfc3339(), utc);
        }
        assert_eq!(
            one("HEXTORAW('7F1D8A5E3C2B4A8E9F000123456789AB')")
                .unwrap()
                .as_deref(),
            Some("7f1d8a5e-3c2b-4a8e-9f00-0123456789ab")
        );
        assert_eq!(one("HEXTORAW('00ff10')").unwrap().as_deref(), Some("AP8Q"));
        let e = one("EMPTY_CLOB()").unwrap_err();
        assert!(e.contains("out of row"), "{e}");
    }
}
