//! SQL Server column values as JSON and as text.
//!
//! tiberius hands every cell over as a [`ColumnData`]; this module maps each
//! variant faithfully, without going through floating point or the local
//! time zone:
//!
//! | SQL Server | JSON |
//! |---|---|
//! | `tinyint`, `smallint`, `int`, `bigint` | number |
//! | `real`, `float` | number (`real` by its shortest decimal form, `0.1` not `0.10000000149…`) |
//! | `bit` | `true` / `false` |
//! | `decimal`, `numeric`, `money` | **string** with the column's scale (`"12.3400"`): exact, where a JSON number would be read as a double |
//! | `char`, `varchar`, `nchar`, `nvarchar(max)`, `text`, `xml` | string |
//! | `uniqueidentifier` | string, lowercase hyphenated |
//! | `binary`, `varbinary(max)`, `image` | string, standard base64 with padding |
//! | `date` | `"2026-11-23"` |
//! | `time(n)` | `"16:11:28.1234567"` (n fraction digits) |
//! | `datetime2(n)` | `"2026-11-23T16:11:28.1234567"` (no zone: the column has none) |
//! | `datetimeoffset(n)` | `"2026-11-23T17:11:28.1234567+01:00"` (RFC 3339, the stored offset kept) |
//! | `datetime` | `"2026-11-23T16:11:28.123"` (its 1/300 s ticks rounded to ms as SQL Server prints them) |
//! | `smalldatetime` | `"2026-11-23T16:11:00"` |
//! | NULL | `null` |
//!
//! TDS sends a `datetimeoffset` as its UTC `datetime2` and the offset in
//! minutes (MS-TDS 2.2.5.5.1.8); the local time shown is UTC plus the
//! offset. tiberius agrees for `chrono::DateTime<FixedOffset>` (its
//! `FromSql` reads the `datetime2` as UTC, its `IntoSql` writes
//! `naive_utc()`); its `chrono::DateTime<Utc>` `FromSql` subtracts the
//! offset from that UTC value once more, which is one reason this module
//! does its own conversions.

use base64::Engine;
use chrono::{Duration, NaiveDate, NaiveDateTime, NaiveTime, Timelike};
use serde_json::{Number, Value};
use tiberius::ColumnData;
use tiberius::numeric::Numeric;
use tiberius::time::{Date, DateTime, DateTime2, DateTimeOffset, SmallDateTime, Time};

/// A cell as JSON. An error only for values TDS cannot have produced (a
/// date out of chrono's range).
pub fn cell_json(cell: &ColumnData<'_>) -> Result<Value, String> {
    Ok(match cell {
        ColumnData::U8(v) => v.map_or(Value::Null, Value::from),
        ColumnData::I16(v) => v.map_or(Value::Null, Value::from),
        ColumnData::I32(v) => v.map_or(Value::Null, Value::from),
        ColumnData::I64(v) => v.map_or(Value::Null, Value::from),
        ColumnData::F32(v) => match v {
            // The shortest decimal that reads back as the same f32.
            Some(f) => float(f.to_string().parse::<f64>().unwrap_or(f64::from(*f))),
            None => Value::Null,
        },
        ColumnData::F64(v) => v.map_or(Value::Null, float),
        ColumnData::Bit(v) => v.map_or(Value::Null, Value::Bool),
        ColumnData::String(v) => v
            .as_ref()
            .map_or(Value::Null, |s| Value::String(s.to_string())),
        ColumnData::Guid(v) => v.map_or(Value::Null, |g| Value::String(g.to_string())),
        ColumnData::Binary(v) => v.as_ref().map_or(Value::Null, |b| {
            Value::String(base64::engine::general_purpose::STANDARD.encode(b))
        }),
        ColumnData::Numeric(v) => v.map_or(Value::Null, |n| Value::String(numeric_text(n))),
        ColumnData::Xml(v) => v
            .as_ref()
            .map_or(Value::Null, |x| Value::String(x.to_string())),
        ColumnData::DateTime(v) => opt(v.map(datetime_text))?,
        ColumnData::SmallDateTime(v) => opt(v.map(smalldatetime_text))?,
        ColumnData::Time(v) => v.map_or(Value::Null, |t| Value::String(time_text(t))),
        ColumnData::Date(v) => opt(v.map(|d| date(d).map(|d| d.format("%Y-%m-%d").to_string())))?,
        ColumnData::DateTime2(v) => opt(v.map(datetime2_text))?,
        ColumnData::DateTimeOffset(v) => opt(v.map(datetimeoffset_text))?,
    })
}

/// A cell as the text an [`OutboxRow`](crate::event::OutboxRow) column
/// holds: strings as they are, every other value in its JSON form without
/// quotes; `None` for NULL.
pub fn cell_text(cell: &ColumnData<'_>) -> Result<Option<String>, String> {
    Ok(match cell_json(cell)? {
        Value::Null => None,
        Value::String(s) => Some(s),
        other => Some(other.to_string()),
    })
}

fn opt(v: Option<Result<String, String>>) -> Result<Value, String> {
    match v {
        None => Ok(Value::Null),
        Some(r) => r.map(Value::String),
    }
}

fn float(f: f64) -> Value {
    Number::from_f64(f).map_or(Value::Null, Value::Number)
}

/// `decimal(p, s)` exactly, with its `s` fraction digits.
pub fn numeric_text(n: Numeric) -> String {
    let value = n.value();
    let scale = n.scale() as usize;
    let digits = value.unsigned_abs().to_string();
    let sign = if value < 0 { "-" } else { "" };
    if scale == 0 {
        return format!("{sign}{digits}");
    }
    let padded = format!("{digits:0>width$}", width = scale + 1);
    let (int, frac) = padded.split_at(padded.len() - scale);
    format!("{sign}{int}.{frac}")
}

/// Days from 0001-01-01.
fn date(d: Date) -> Result<NaiveDate, String> {
    NaiveDate::from_ymd_opt(1, 1, 1)
        .and_then(|base| base.checked_add_signed(Duration::days(i64::from(d.days()))))
        .ok_or_else(|| format!("date {} days after 0001-01-01 is out of range", d.days()))
}

/// `HH:MM:SS` and the fraction at the column's scale (at most 7 in TDS;
/// clamped, so that a malformed scale cannot overflow).
fn time_text(t: Time) -> String {
    let scale = u32::from(t.scale()).min(9);
    let per_second = 10u64.pow(scale);
    let secs = t.increments() / per_second;
    let frac = t.increments() % per_second;
    let clock = format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
    if scale == 0 {
        clock
    } else {
        format!("{clock}.{frac:0>width$}", width = scale as usize)
    }
}

fn datetime2_text(dt: DateTime2) -> Result<String, String> {
    Ok(format!(
        "{}T{}",
        date(dt.date())?.format("%Y-%m-%d"),
        time_text(dt.time())
    ))
}

/// The local time (UTC + offset) and the offset, RFC 3339.
fn datetimeoffset_text(dto: DateTimeOffset) -> Result<String, String> {
    let utc = dto.datetime2();
    let day = date(utc.date())?;
    let scale = u32::from(utc.time().scale()).min(9);
    let nanos = utc.time().increments() * 10u64.pow(9 - scale.min(9));
    let at = NaiveDateTime::new(day, NaiveTime::MIN)
        + Duration::nanoseconds(nanos as i64)
        + Duration::minutes(i64::from(dto.offset()));
    let local_increments = (i64::from(at.time().num_seconds_from_midnight()) * 1_000_000_000
        + i64::from(at.time().nanosecond()))
        / 10i64.pow(9 - scale.min(9));
    let offset = dto.offset();
    let sign = if offset < 0 { '-' } else { '+' };
    let abs = offset.unsigned_abs();
    Ok(format!(
        "{}T{}{sign}{:02}:{:02}",
        at.date().format("%Y-%m-%d"),
        time_text(Time::new(local_increments as u64, scale as u8)),
        abs / 60,
        abs % 60
    ))
}

/// `datetime`: days from 1900-01-01 and 1/300 s ticks since midnight.
fn datetime_text(dt: DateTime) -> Result<String, String> {
    let day = NaiveDate::from_ymd_opt(1900, 1, 1)
        .and_then(|b| b.checked_add_signed(Duration::days(i64::from(dt.days()))))
        .ok_or_else(|| {
            format!(
                "datetime {} days after 1900-01-01 is out of range",
                dt.days()
            )
        })?;
    // Rounded to the millisecond as SQL Server prints it (.000, .003, .007).
    let ms = (u64::from(dt.seconds_fragments()) * 20 + 3) / 6;
    Ok(format!(
        "{}T{}",
        day.format("%Y-%m-%d"),
        time_text(Time::new(ms, 3))
    ))
}

/// `smalldatetime`: days from 1900-01-01 and minutes since midnight.
fn smalldatetime_text(dt: SmallDateTime) -> Result<String, String> {
    let day = NaiveDate::from_ymd_opt(1900, 1, 1)
        .and_then(|b| b.checked_add_signed(Duration::days(i64::from(dt.days()))))
        .ok_or_else(|| {
            format!(
                "smalldatetime {} days after 1900-01-01 is out of range",
                dt.days()
            )
        })?;
    let minutes = u64::from(dt.seconds_fragments());
    Ok(format!(
        "{}T{}",
        day.format("%Y-%m-%d"),
        time_text(Time::new(minutes * 60, 0))
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    /// Days from 0001-01-01 to `y-m-d`.
    fn days(y: i32, m: u32, d: u32) -> u32 {
        (NaiveDate::from_ymd_opt(y, m, d).unwrap() - NaiveDate::from_ymd_opt(1, 1, 1).unwrap())
            .num_days() as u32
    }

    fn json(cell: ColumnData<'_>) -> Value {
        cell_json(&cell).unwrap()
    }

    #[test]
    fn integers_bits_and_nulls() {
        assert_eq!(json(ColumnData::U8(Some(255))), Value::from(255));
        assert_eq!(json(ColumnData::I16(Some(-2))), Value::from(-2));
        assert_eq!(json(ColumnData::I32(Some(7))), Value::from(7));
        assert_eq!(
            json(ColumnData::I64(Some(9_007_199_254_740_993))),
            Value::from(9_007_199_254_740_993i64)
        );
        assert_eq!(json(ColumnData::Bit(Some(true))), Value::Bool(true));
        assert_eq!(json(ColumnData::I32(None)), Value::Null);
        assert_eq!(json(ColumnData::String(None)), Value::Null);
        assert_eq!(
            cell_text(&ColumnData::Bit(Some(false))).unwrap().as_deref(),
            Some("false")
        );
        assert_eq!(cell_text(&ColumnData::I64(None)).unwrap(), None);
    }

    #[test]
    fn floats_keep_their_shortest_decimal_form() {
        assert_eq!(json(ColumnData::F32(Some(0.1))).to_string(), "0.1");
        assert_eq!(json(ColumnData::F64(Some(1.5e300))).to_string(), "1.5e+300");
    }

    #[test]
    fn decimal_is_an_exact_string_with_its_scale() {
        assert_eq!(
            json(ColumnData::Numeric(Some(Numeric::new_with_scale(
                123400, 4
            )))),
            Value::String("12.3400".into())
        );
        assert_eq!(numeric_text(Numeric::new_with_scale(-5, 3)), "-0.005");
        assert_eq!(numeric_text(Numeric::new_with_scale(42, 0)), "42");
        // Beyond a double's 15–17 digits, nothing is rounded.
        assert_eq!(
            numeric_text(Numeric::new_with_scale(12345678901234567890123456789, 10)),
            "1234567890123456789.0123456789"
        );
    }

    #[test]
    fn nvarchar_max_is_kept_whole() {
        let long = "é".repeat(100_000);
        assert_eq!(
            json(ColumnData::String(Some(Cow::Owned(long.clone())))),
            Value::String(long)
        );
    }

    #[test]
    fn uniqueidentifier_is_lowercase_hyphenated() {
        let g = uuid::Uuid::parse_str("7F1D8A5E-3C2B-4A8E-9F00-0123456789AB").unwrap();
        assert_eq!(
            json(ColumnData::Guid(Some(g))),
            Value::String("7f1d8a5e-3c2b-4a8e-9f00-0123456789ab".into())
        );
    }

    #[test]
    fn varbinary_is_base64() {
        assert_eq!(
            json(ColumnData::Binary(Some(Cow::Borrowed(
                &[0u8, 1, 2, 253, 254, 255][..]
            )))),
            Value::String("AAEC/f7/".into())
        );
        assert_eq!(
            json(ColumnData::Binary(Some(Cow::Borrowed(&b""[..])))),
            Value::String(String::new())
        );
    }

    #[test]
    fn date_and_time_at_their_scale() {
        assert_eq!(
            json(ColumnData::Date(Some(Date::new(days(2026, 11, 23))))),
            Value::String("2026-11-23".into())
        );
        let t = 16 * 3600 + 11 * 60 + 28;
        assert_eq!(
            json(ColumnData::Time(Some(Time::new(
                t * 10_000_000 + 1_234_567,
                7
            )))),
            Value::String("16:11:28.1234567".into())
        );
        assert_eq!(
            json(ColumnData::Time(Some(Time::new(t * 1000 + 5, 3)))),
            Value::String("16:11:28.005".into())
        );
        assert_eq!(
            json(ColumnData::Time(Some(Time::new(t, 0)))),
            Value::String("16:11:28".into())
        );
    }

    #[test]
    fn datetime2_has_no_zone() {
        let t = 16 * 3600 + 11 * 60 + 28;
        let dt = DateTime2::new(
            Date::new(days(2026, 11, 23)),
            Time::new(t * 10_000_000 + 1_234_567, 7),
        );
        assert_eq!(
            json(ColumnData::DateTime2(Some(dt))),
            Value::String("2026-11-23T16:11:28.1234567".into())
        );
        // The outbox's created_at reads back as the same instant (UTC).
        let text = cell_text(&ColumnData::DateTime2(Some(dt)))
            .unwrap()
            .unwrap();
        assert_eq!(
            crate::event::parse_timestamp(&text).unwrap().to_rfc3339(),
            "2026-11-23T16:11:28.123456700+00:00"
        );
    }

    #[test]
    fn datetimeoffset_keeps_its_offset_and_its_instant() {
        // Stored as 23:30 UTC with +02:00: 01:30 the next day, local.
        let utc = DateTime2::new(
            Date::new(days(2026, 11, 23)),
            Time::new((23 * 3600 + 30 * 60) * 1000 + 250, 3),
        );
        let text = json(ColumnData::DateTimeOffset(Some(DateTimeOffset::new(
            utc, 120,
        ))));
        assert_eq!(text, Value::String("2026-11-24T01:30:00.250+02:00".into()));
        let instant = crate::event::parse_timestamp(text.as_str().unwrap()).unwrap();
        assert_eq!(instant.to_rfc3339(), "2026-11-23T23:30:00.250+00:00");
        let west = DateTimeOffset::new(
            DateTime2::new(Date::new(days(2026, 1, 1)), Time::new(3600, 0)),
            -330,
        );
        assert_eq!(
            json(ColumnData::DateTimeOffset(Some(west))),
            Value::String("2025-12-31T19:30:00-05:30".into())
        );
    }

    /// A `DateTimeOffset` as tiberius builds it from a chrono
    /// `DateTime<FixedOffset>` (its `IntoSql`: `naive_utc()` at scale 7 and
    /// the offset in minutes), i.e. as the wire carries it.
    fn as_tiberius_encodes(text: &str) -> DateTimeOffset {
        let dt = chrono::DateTime::parse_from_rfc3339(text).unwrap();
        let naive = dt.naive_utc();
        let t = naive.time();
        let nanos =
            u64::from(t.num_seconds_from_midnight()) * 1_000_000_000 + u64::from(t.nanosecond());
        let days = (naive.date() - NaiveDate::from_ymd_opt(1, 1, 1).unwrap()).num_days();
        DateTimeOffset::new(
            DateTime2::new(Date::new(days as u32), Time::new(nanos / 100, 7)),
            (dt.offset().local_minus_utc() / 60) as i16,
        )
    }

    #[test]
    fn datetimeoffset_reads_back_what_tiberius_writes() {
        for text in [
            "2026-11-24T01:30:00.2500000+02:00",
            "2025-12-31T19:30:00.0000000-05:30",
            "2026-03-29T00:59:59.9999999+14:00",
            "0001-01-01T00:00:00.0000000+00:00",
            "9999-12-31T23:59:59.9999999+12:00",
        ] {
            let got = json(ColumnData::DateTimeOffset(Some(as_tiberius_encodes(text))));
            assert_eq!(got, Value::String(text.into()));
        }
    }

    #[test]
    fn legacy_datetime_and_smalldatetime() {
        let days_1900 = (NaiveDate::from_ymd_opt(2026, 11, 23).unwrap()
            - NaiveDate::from_ymd_opt(1900, 1, 1).unwrap())
        .num_days();
        // 1/300 s ticks: 16:11:28 and 2 ticks = .007 as SQL Server prints it.
        let ticks = (16 * 3600 + 11 * 60 + 28) * 300 + 2;
        assert_eq!(
            json(ColumnData::DateTime(Some(DateTime::new(
                days_1900 as i32,
                ticks
            )))),
            Value::String("2026-11-23T16:11:28.007".into())
        );
        assert_eq!(
            json(ColumnData::SmallDateTime(Some(SmallDateTime::new(
                days_1900 as u16,
                16 * 60 + 11
            )))),
            Value::String("2026-11-23T16:11:00".into())
        );
    }
}
