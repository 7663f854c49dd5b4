//! Capture triggers on MariaDB (and MySQL): row-level, the only kind the
//! servers have.
//!
//! Each captured table gets up to three `AFTER … FOR EACH ROW` triggers,
//! `sitesync_cap_<table>_ins`, `_upd` and `_del` (names of their own, so
//! that they never clash with the application's; MariaDB 10.2.3+ and MySQL
//! 5.7+ run several triggers per event). Each writes one outbox row with
//! `JSON_OBJECT` unless the session is the sink's
//! (`@sitesync_applying = 1`).
//!
//! Values, as the sinks read them: numbers as JSON numbers, `DATETIME` as
//! its text (no zone), `TIMESTAMP` converted from the session's zone to
//! UTC and written `…Z`, a JSON column (MariaDB's `LONGTEXT` with a
//! `JSON_VALID` check, MySQL's `json`) as nested JSON. The key is built as
//! [`crate::sink::mapping::key_text`] writes it; the backslash of the
//! escaping is `CHAR(92)`, so that the trigger reads the same whatever
//! `NO_BACKSLASH_ESCAPES` says (a trigger keeps the SQL mode it was made
//! under).
//!
//! An UPDATE that changes the key writes a delete of the old key (when
//! the table has a delete route) before the upsert of the new row. The
//! comparison is binary (`BINARY OLD.k <=> BINARY NEW.k`): `'a'` and `'A'`
//! are one row to a case-insensitive collation but two entity keys.
//!
//! MariaDB replaces a trigger atomically (`CREATE OR REPLACE TRIGGER`);
//! MySQL has no such statement, and gets `DROP TRIGGER IF EXISTS` and
//! `CREATE TRIGGER`: a write between the two is not captured there.
//!
//! The fingerprint is in a comment at the top of each body, which the
//! server keeps (`information_schema.TRIGGERS.ACTION_STATEMENT`).

use super::conn::{self, literal, quote, quote_table};
use super::settings::Settings;
use crate::capture::{
    Capture, Column, Field, Generated, Installed, MARK, Plan, Side, Table, group_keys, object_name,
};
use crate::config::{ConnectorConfig, redact_url};
use crate::error::TargetError;
use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, Value};

/// Names of triggers are at most 64 characters.
const NAME_MAX: usize = 64;

/// Capture on one MariaDB or MySQL database.
pub struct MariaDbCapture {
    url: String,
    opts: Opts,
    /// The outbox, quoted.
    outbox: String,
    /// CREATE OR REPLACE TRIGGER (MariaDB) rather than DROP + CREATE
    /// (MySQL); learnt from the server's version once connected.
    or_replace: std::sync::atomic::AtomicBool,
}

impl MariaDbCapture {
    pub fn new(_cfg: &ConnectorConfig, db: &Settings) -> Result<MariaDbCapture, TargetError> {
        Ok(MariaDbCapture {
            url: db.url.clone(),
            opts: conn::opts(db)?,
            outbox: quote_table(&db.outbox_table),
            or_replace: std::sync::atomic::AtomicBool::new(true),
        })
    }

    async fn conn(&self) -> Result<Conn, String> {
        let mut c = Conn::new(self.opts.clone()).await.map_err(|e| {
            format!(
                "connecting to {}: {}",
                redact_url(&self.url),
                conn::describe(&e)
            )
        })?;
        let version: Option<String> = c
            .query_first("SELECT VERSION()")
            .await
            .map_err(|e| conn::describe(&e))?;
        self.or_replace.store(
            version.is_some_and(|v| v.contains("MariaDB")),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(c)
    }
}

/// `(schema or NULL for the connection's database, table)`.
fn parts(table: &str) -> (Value, Value) {
    match table.split_once('.') {
        Some((s, t)) => (Value::from(s), Value::from(t)),
        None => (Value::NULL, Value::from(table)),
    }
}

/// A column's value as text (`""` for NULL).
fn text(v: &Value) -> String {
    super::target::text(Some(v)).unwrap_or_default()
}

/// The trigger of `table` for `op` (`ins`, `upd`, `del`).
fn trigger_name(table: &str, op: &str) -> String {
    let name = table.rsplit('.').next().unwrap_or(table);
    object_name("sitesync_cap_", name, &format!("_{op}"), NAME_MAX)
}

/// The trigger, schema-qualified as the table is.
fn trigger_ref(table: &str, name: &str) -> String {
    match table.split_once('.') {
        Some((s, _)) => format!("{}.{}", quote(s), quote(name)),
        None => quote(name),
    }
}

fn backslash() -> &'static str {
    "CHAR(92 USING utf8mb4)"
}

/// A column's value in the event.
fn value(row: &str, c: &Column) -> String {
    let v = format!("{row}.{}", quote(&c.name));
    match c.ty.as_str() {
        "json" => format!("JSON_EXTRACT({v}, '$')"),
        "timestamp" => format!(
            "DATE_FORMAT(CONVERT_TZ({v}, @@session.time_zone, '+00:00'), '%Y-%m-%dT%H:%i:%s.%fZ')"
        ),
        "bit" => format!("{v} + 0"),
        _ => v,
    }
}

/// One key part as text, the way `key_text` writes the column's JSON value.
fn key_part(row: &str, c: &Column) -> String {
    let v = format!("{row}.{}", quote(&c.name));
    match c.ty.as_str() {
        "char" | "varchar" | "tinytext" | "text" | "mediumtext" | "longtext" | "enum" | "set" => v,
        "decimal" if c.scale > 0 => {
            format!("TRIM(TRAILING '.' FROM TRIM(TRAILING '0' FROM CAST({v} AS CHAR)))")
        }
        "timestamp" | "bit" => format!("CAST({} AS CHAR)", value(row, c)),
        _ => format!("CAST({v} AS CHAR)"),
    }
}

pub(super) fn key_expr(row: &str, side: &Side) -> String {
    if let [one] = side.key.as_slice() {
        return key_part(row, one);
    }
    let b = backslash();
    let parts: Vec<String> = side
        .key
        .iter()
        .map(|c| {
            format!(
                "REPLACE(REPLACE({}, {b}, CONCAT({b}, {b})), ',', CONCAT({b}, ','))",
                key_part(row, c)
            )
        })
        .collect();
    format!("CONCAT({})", parts.join(", ',', "))
}

pub(super) fn data_expr(row: &str, fields: &[Field]) -> String {
    let pairs: Vec<String> = fields
        .iter()
        .map(|f| format!("{}, {}", literal(&f.field), value(row, &f.column)))
        .collect();
    format!("JSON_OBJECT({})", pairs.join(", "))
}

/// The INSERT of one event of `side` for the row `row` (`NEW` or `OLD`).
fn event(outbox: &str, side: &Side, row: &str) -> String {
    format!(
        "INSERT INTO {outbox} (`type`, `entity_key`, `data`) VALUES ({}, {}, {});",
        literal(&side.kind),
        key_expr(row, side),
        data_expr(row, &side.fields)
    )
}

impl MariaDbCapture {
    /// The body for `op`, or `None` when the plan writes nothing for it.
    fn body(&self, plan: &Plan, op: &str, fp: &str) -> Option<String> {
        let mut sql = Vec::new();
        match op {
            "ins" => sql.push(event(&self.outbox, plan.upsert.as_ref()?, "NEW")),
            "upd" => {
                if plan.upsert.is_none() && plan.delete.is_none() {
                    return None;
                }
                if let Some(d) = &plan.delete {
                    let same = d
                        .key
                        .iter()
                        .map(|k| format!("BINARY OLD.{q} <=> BINARY NEW.{q}", q = quote(&k.name)))
                        .collect::<Vec<_>>()
                        .join(" AND ");
                    sql.push(format!(
                        "IF NOT ({same}) THEN\n        {}\n    END IF;",
                        event(&self.outbox, d, "OLD")
                    ));
                }
                if let Some(u) = &plan.upsert {
                    sql.push(event(&self.outbox, u, "NEW"));
                }
            }
            _ => sql.push(event(&self.outbox, plan.delete.as_ref()?, "OLD")),
        }
        Some(format!(
            "BEGIN\n  -- {MARK}{fp}: written by `sitesync capture add` for {}; do not edit (run it again)\n  IF @sitesync_applying IS NULL OR @sitesync_applying <> 1 THEN\n    {}\n  END IF;\nEND",
            plan.table,
            sql.join("\n    ")
        ))
    }
}

impl Capture for MariaDbCapture {
    const FOLD_CASE: bool = true;

    async fn table(&self, table: &str) -> Result<Option<Table>, String> {
        let mut c = self.conn().await?;
        let (schema, name) = parts(table);
        let rows: Vec<(Value, Value, Value, Value)> = c
            .exec(
                "SELECT COLUMN_NAME, LOWER(DATA_TYPE), NUMERIC_SCALE, LOWER(EXTRA) FROM information_schema.COLUMNS \
                 WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? ORDER BY ORDINAL_POSITION",
                (schema.clone(), name.clone()),
            )
            .await
            .map_err(|e| format!("reading the columns of {table}: {}", conn::describe(&e)))?;
        if rows.is_empty() {
            return Ok(None);
        }
        // MariaDB's JSON is LONGTEXT with a JSON_VALID check (MySQL's
        // CHECK_CONSTRAINTS has no TABLE_NAME: the query fails there, and
        // its JSON columns say `json`).
        let checks: Vec<String> = c
            .exec::<Value, _, _>(
                "SELECT CHECK_CLAUSE FROM information_schema.CHECK_CONSTRAINTS WHERE CONSTRAINT_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ?",
                (schema.clone(), name.clone()),
            )
            .await
            .unwrap_or_default()
            .iter()
            .map(|v| text(v).to_lowercase().replace(' ', ""))
            .collect();
        let mut columns = Vec::new();
        let mut generated = Vec::new();
        for (n, ty, scale, extra) in rows {
            let n = text(&n);
            let extra = text(&extra);
            if extra.contains("generated")
                || extra.contains("virtual")
                || extra.contains("persistent")
            {
                generated.push(n);
                continue;
            }
            let json_check = format!("json_valid(`{}`)", n.to_lowercase().replace('`', "``"));
            let ty = if checks.contains(&json_check) {
                "json".to_string()
            } else {
                text(&ty)
            };
            columns.push(Column {
                route_name: n.clone(),
                name: n,
                ty,
                scale: text(&scale).parse().unwrap_or(0),
            });
        }
        let keys: Vec<(Value, Value)> = c
            .exec(
                "SELECT INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS \
                 WHERE TABLE_SCHEMA = COALESCE(?, DATABASE()) AND TABLE_NAME = ? AND NON_UNIQUE = 0 ORDER BY INDEX_NAME, SEQ_IN_INDEX",
                (schema, name),
            )
            .await
            .map_err(|e| format!("reading the unique keys of {table}: {}", conn::describe(&e)))?;
        Ok(Some(Table {
            columns,
            generated,
            unique: group_keys(keys.iter().map(|(i, c)| (text(i), text(c)))),
        }))
    }

    async fn installed(&self, table: &str) -> Result<Vec<Installed>, String> {
        let mut c = self.conn().await?;
        let (schema, name) = parts(table);
        let rows: Vec<(Value, Value)> = c
            .exec(
                "SELECT TRIGGER_NAME, ACTION_STATEMENT FROM information_schema.TRIGGERS \
                 WHERE EVENT_OBJECT_SCHEMA = COALESCE(?, DATABASE()) AND EVENT_OBJECT_TABLE = ? AND TRIGGER_NAME LIKE 'sitesync\\_cap\\_%'",
                (schema, name),
            )
            .await
            .map_err(|e| format!("reading the triggers of {table}: {}", conn::describe(&e)))?;
        Ok(rows
            .iter()
            .map(|(n, body)| Installed {
                name: text(n),
                definition: text(body),
                // MariaDB and MySQL cannot disable a trigger.
                enabled: true,
            })
            .collect())
    }

    fn install(&self, plan: &Plan, fp: &str) -> Generated {
        let or_replace = self.or_replace.load(std::sync::atomic::Ordering::Relaxed);
        let mut triggers = Vec::new();
        let mut statements = Vec::new();
        for (op, event) in [("ins", "INSERT"), ("upd", "UPDATE"), ("del", "DELETE")] {
            let Some(body) = self.body(plan, op, fp) else {
                continue;
            };
            let name = trigger_name(&plan.table, op);
            let at = trigger_ref(&plan.table, &name);
            if !or_replace {
                statements.push(format!("DROP TRIGGER IF EXISTS {at}"));
            }
            statements.push(format!(
                "CREATE {}TRIGGER {at} AFTER {event} ON {} FOR EACH ROW\n{body}",
                if or_replace { "OR REPLACE " } else { "" },
                quote_table(&plan.table)
            ));
            triggers.push(name);
        }
        Generated {
            triggers,
            statements,
        }
    }

    fn remove(&self, table: &str, triggers: &[String]) -> Vec<String> {
        triggers
            .iter()
            .map(|t| format!("DROP TRIGGER IF EXISTS {}", trigger_ref(table, t)))
            .collect()
    }

    async fn execute(&self, statements: &[String]) -> Result<(), String> {
        // DDL commits on its own: one statement at a time.
        let mut c = self.conn().await?;
        for s in statements {
            c.query_drop(s)
                .await
                .map_err(|e| format!("{}\n  in: {s}", conn::describe(&e)))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Field;

    fn col(name: &str, ty: &str, scale: u32) -> Column {
        Column {
            name: name.into(),
            route_name: name.into(),
            ty: ty.into(),
            scale,
        }
    }

    #[test]
    fn keys_are_written_as_the_sink_compares_them() {
        let side = Side {
            kind: "t.upsert".into(),
            key: vec![col("a", "varchar", 0), col("n", "decimal", 2)],
            fields: vec![Field {
                column: col("t", "timestamp", 0),
                field: "when".into(),
            }],
        };
        let k = key_expr("NEW", &side);
        assert!(
            k.starts_with("CONCAT(REPLACE(REPLACE(NEW.`a`, CHAR(92 USING utf8mb4)"),
            "{k}"
        );
        assert!(
            k.contains("TRIM(TRAILING '0' FROM CAST(NEW.`n` AS CHAR))"),
            "{k}"
        );
        assert!(!k.contains('\\'), "no backslash in the SQL text: {k}");
        assert_eq!(
            key_part("NEW", &col("n", "decimal", 0)),
            "CAST(NEW.`n` AS CHAR)"
        );
        let d = data_expr("NEW", &side.fields);
        assert!(
            d.contains("'when', DATE_FORMAT(CONVERT_TZ(NEW.`t`, @@session.time_zone, '+00:00')"),
            "{d}"
        );
    }
}
