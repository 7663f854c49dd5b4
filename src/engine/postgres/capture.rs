//! Capture triggers on PostgreSQL: statement-level, with transition tables.
//!
//! Each captured table gets up to three `AFTER … FOR EACH STATEMENT`
//! triggers (`sitesync_capture_ins`, `_upd`, `_del`), each calling a
//! PL/pgSQL function of its own in the table's schema
//! (`sitesync_capture_<table>_ins`, …). A function reads the statement's
//! rows from its transition tables (`REFERENCING NEW TABLE AS sitesync_new
//! OLD TABLE AS sitesync_old`) and writes their events with one `INSERT …
//! SELECT` into the outbox: an UPDATE of 100,000 rows is one trigger call
//! and one statement, not 100,000.
//!
//! - the sink's transactions are skipped:
//!   `current_setting('sitesync.applying', true) = 'on'`;
//! - `data` is `to_jsonb` of the row, less the columns the route does not
//!   write back, with renamed columns under their fields: values in
//!   PostgreSQL's JSON forms (`timestamptz` as ISO 8601 with its offset,
//!   `numeric` as a JSON number), which every sink reads;
//! - `entity_key` is built in SQL as [`crate::sink::mapping::key_text`]
//!   writes it: integers as digits, strings as they are, an integral
//!   `numeric` without decimals, a composite key joined with `,`, each part
//!   with `\` and `,` escaped;
//! - an UPDATE writes, when the table has a delete route, a delete for each
//!   old key that no new row holds (the key changed), then an upsert for
//!   every new row.
//!
//! The fingerprint is in a comment of each function's body (`prosrc`).

use super::settings::Settings;
use super::target::{describe, quote, quote_table};
use crate::capture::{
    Capture, Column, Field, Generated, Installed, MARK, Plan, Side, Table, object_name,
};
use crate::config::{ConnectorConfig, redact_url};
use crate::error::{Cause, TargetError};
use tokio_postgres::Client;

/// PostgreSQL's names are at most 63 bytes.
const NAME_MAX: usize = 63;

/// The triggers of a table, by event.
const TRIGGERS: [(&str, &str); 3] = [("ins", "INSERT"), ("upd", "UPDATE"), ("del", "DELETE")];

/// Capture on one PostgreSQL database.
pub struct PgCapture {
    url: String,
    pg: tokio_postgres::Config,
    /// The outbox, quoted.
    outbox: String,
}

impl PgCapture {
    pub fn new(_cfg: &ConnectorConfig, db: &Settings) -> Result<PgCapture, TargetError> {
        let pg = db.url.parse().map_err(|e| {
            TargetError::operator(
                Cause::Config,
                format!("database.url `{}`: {e}", redact_url(&db.url)),
            )
        })?;
        let (schema, table) = db.outbox_parts();
        Ok(PgCapture {
            url: db.url.clone(),
            pg,
            outbox: format!("{}.{}", quote(schema), quote(table)),
        })
    }

    async fn client(&self) -> Result<Client, String> {
        let (client, connection) = self
            .pg
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("connecting to {}: {e}", redact_url(&self.url)))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(client)
    }
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `(schema, table)` of a route's table, schema defaulting to `public`.
fn parts(table: &str) -> (&str, &str) {
    table.split_once('.').unwrap_or(("public", table))
}

/// The function a trigger calls.
fn function(table: &str, op: &str) -> String {
    let (schema, name) = parts(table);
    format!(
        "{}.{}",
        quote(schema),
        quote(&object_name(
            "sitesync_capture_",
            name,
            &format!("_{op}"),
            NAME_MAX
        ))
    )
}

/// One key part as text, the way `key_text` writes the column's JSON value.
fn key_part(alias: &str, c: &Column) -> String {
    let v = format!("{alias}.{}", quote(&c.name));
    match c.ty.as_str() {
        "int2" | "int4" | "int8" | "bool" | "oid" => format!("{v}::text"),
        "numeric" | "float4" | "float8" => format!(
            "CASE WHEN {v}::numeric = trunc({v}::numeric) AND abs({v}::numeric) < 9007199254740992 \
             THEN trunc({v}::numeric)::text ELSE to_jsonb({v})::text END"
        ),
        _ => format!("(to_jsonb({v}) #>> '{{}}')"),
    }
}

/// The entity key of a row (`alias`) for `side`.
pub(super) fn key_expr(alias: &str, side: &Side) -> String {
    if let [one] = side.key.as_slice() {
        return key_part(alias, one);
    }
    side.key
        .iter()
        .map(|c| {
            format!(
                "replace(replace({}, E'\\\\', E'\\\\\\\\'), ',', E'\\\\,')",
                key_part(alias, c)
            )
        })
        .collect::<Vec<_>>()
        .join(" || ',' || ")
}

/// The event data of a row (`alias`) of `columns`, for `fields`.
pub(super) fn data_expr(alias: &str, columns: &[String], fields: &[Field]) -> String {
    // Columns left out, and renamed ones (added back under their field).
    let mut minus: Vec<&str> = columns
        .iter()
        .filter(|c| {
            !fields
                .iter()
                .any(|f| f.column.name == **c && f.field == **c)
        })
        .map(String::as_str)
        .collect();
    minus.sort();
    let renamed: Vec<&Field> = fields.iter().filter(|f| f.column.name != f.field).collect();
    let mut expr = format!("to_jsonb({alias})");
    if !minus.is_empty() {
        expr = format!(
            "({expr} - ARRAY[{}]::text[])",
            minus
                .iter()
                .map(|c| literal(c))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // jsonb_build_object takes at most 100 arguments.
    for chunk in renamed.chunks(50) {
        let pairs = chunk
            .iter()
            .map(|f| format!("{}, {alias}.{}", literal(&f.field), quote(&f.column.name)))
            .collect::<Vec<_>>()
            .join(", ");
        expr = format!("{expr} || jsonb_build_object({pairs})");
    }
    expr
}

/// `INSERT INTO outbox … SELECT` the events of `side` for the rows of
/// `from` (a transition table), with an optional condition.
fn events(outbox: &str, side: &Side, columns: &[String], from: &str, filter: &str) -> String {
    format!(
        "    INSERT INTO {outbox} (type, entity_key, data)\n    SELECT {}, {}, {}\n    FROM {from} r{filter};\n",
        literal(&side.kind),
        key_expr("r", side),
        data_expr("r", columns, &side.fields),
    )
}

impl PgCapture {
    /// The body of the function for `op`, or `None` when the plan writes
    /// nothing for it.
    fn body(&self, plan: &Plan, columns: &[String], op: &str, fp: &str) -> Option<String> {
        let mut sql = String::new();
        match op {
            "ins" => sql.push_str(&events(
                &self.outbox,
                plan.upsert.as_ref()?,
                columns,
                "sitesync_new",
                "",
            )),
            "upd" => {
                if plan.upsert.is_none() && plan.delete.is_none() {
                    return None;
                }
                if let Some(d) = &plan.delete {
                    // The old keys no new row holds: the key changed.
                    let same = d
                        .key
                        .iter()
                        .map(|k| format!("n.{q} = r.{q}", q = quote(&k.name)))
                        .collect::<Vec<_>>()
                        .join(" AND ");
                    let filter = format!(
                        "\n    WHERE NOT EXISTS (SELECT 1 FROM sitesync_new n WHERE {same})"
                    );
                    sql.push_str(&events(&self.outbox, d, columns, "sitesync_old", &filter));
                }
                if let Some(u) = &plan.upsert {
                    sql.push_str(&events(&self.outbox, u, columns, "sitesync_new", ""));
                }
            }
            _ => sql.push_str(&events(
                &self.outbox,
                plan.delete.as_ref()?,
                columns,
                "sitesync_old",
                "",
            )),
        }
        Some(format!(
            "\n-- {MARK}{fp}: written by `sitesync capture add` for {}; do not edit (run it again)\nBEGIN\n    IF current_setting('sitesync.applying', true) = 'on' THEN\n        RETURN NULL;\n    END IF;\n{sql}    RETURN NULL;\nEND\n",
            plan.table
        ))
    }
}

impl Capture for PgCapture {
    const FOLD_CASE: bool = false;

    async fn table(&self, table: &str) -> Result<Option<Table>, String> {
        let client = self.client().await?;
        let name = quote_table(table);
        let rows = client
            .query(
                "SELECT a.attname::text, t.typname::text, a.attgenerated <> '' \
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[&name],
            )
            .await
            .map_err(|e| format!("reading the columns of {table}: {}", describe(&e)))?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut columns = Vec::new();
        let mut generated = Vec::new();
        for r in rows {
            let (name, ty, is_generated): (String, String, bool) = (r.get(0), r.get(1), r.get(2));
            if is_generated {
                generated.push(name);
            } else {
                columns.push(Column {
                    route_name: name.clone(),
                    name,
                    ty,
                    scale: 0,
                });
            }
        }
        let unique = client
            .query(
                "SELECT array(SELECT attname::text FROM pg_attribute WHERE attrelid = i.indrelid AND attnum = ANY (i.indkey)) \
                 FROM pg_index i WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL",
                &[&name],
            )
            .await
            .map_err(|e| format!("reading the unique keys of {table}: {}", describe(&e)))?
            .iter()
            .map(|r| r.get::<_, Vec<String>>(0))
            .collect();
        Ok(Some(Table {
            columns,
            generated,
            unique,
        }))
    }

    async fn installed(&self, table: &str) -> Result<Vec<Installed>, String> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT t.tgname::text, t.tgenabled <> 'D', p.prosrc FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid \
                 WHERE t.tgrelid = to_regclass($1) AND NOT t.tgisinternal AND t.tgname LIKE 'sitesync\\_capture\\_%'",
                &[&quote_table(table)],
            )
            .await
            .map_err(|e| format!("reading the triggers of {table}: {}", describe(&e)))?;
        Ok(rows
            .iter()
            .map(|r| Installed {
                name: r.get(0),
                enabled: r.get(1),
                definition: r.get(2),
            })
            .collect())
    }

    fn install(&self, plan: &Plan, fp: &str) -> Generated {
        let table = quote_table(&plan.table);
        let mut triggers = Vec::new();
        let mut statements = Vec::new();
        for (op, event) in TRIGGERS {
            let Some(body) = self.body(plan, &plan.columns, op, fp) else {
                continue;
            };
            let trigger = format!("sitesync_capture_{op}");
            let function = function(&plan.table, op);
            let referencing = match op {
                "ins" => "NEW TABLE AS sitesync_new",
                "upd" => "OLD TABLE AS sitesync_old NEW TABLE AS sitesync_new",
                _ => "OLD TABLE AS sitesync_old",
            };
            statements.push(format!(
                "CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $sitesync${body}$sitesync$"
            ));
            statements.push(format!("DROP TRIGGER IF EXISTS {trigger} ON {table}"));
            statements.push(format!(
                "CREATE TRIGGER {trigger} AFTER {event} ON {table} REFERENCING {referencing} FOR EACH STATEMENT EXECUTE FUNCTION {function}()"
            ));
            triggers.push(trigger);
        }
        Generated {
            triggers,
            statements,
        }
    }

    fn remove(&self, table: &str, triggers: &[String]) -> Vec<String> {
        let quoted = quote_table(table);
        let mut out = Vec::new();
        for t in triggers {
            out.push(format!("DROP TRIGGER IF EXISTS {} ON {quoted}", quote(t)));
            if let Some(op) = t.strip_prefix("sitesync_capture_") {
                out.push(format!("DROP FUNCTION IF EXISTS {}()", function(table, op)));
            }
        }
        out
    }

    async fn execute(&self, statements: &[String]) -> Result<(), String> {
        let mut client = self.client().await?;
        // DDL is transactional: the old triggers stay until the new ones
        // are there, and a failure changes nothing.
        let tx = client.transaction().await.map_err(|e| describe(&e))?;
        for s in statements {
            tx.batch_execute(s)
                .await
                .map_err(|e| format!("{}\n  in: {s}", describe(&e)))?;
        }
        tx.commit().await.map_err(|e| describe(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, ty: &str) -> Column {
        Column {
            name: name.into(),
            route_name: name.into(),
            ty: ty.into(),
            scale: 0,
        }
    }

    #[test]
    fn keys_and_data_are_what_the_sink_reads() {
        let side = Side {
            kind: "orders.upsert".into(),
            key: vec![col("region", "text"), col("no", "int4")],
            fields: vec![
                Field {
                    column: col("region", "text"),
                    field: "region".into(),
                },
                Field {
                    column: col("no", "int4"),
                    field: "no".into(),
                },
                Field {
                    column: col("customer_id", "int4"),
                    field: "customer".into(),
                },
            ],
        };
        assert_eq!(
            key_expr("r", &side),
            "replace(replace((to_jsonb(r.\"region\") #>> '{}'), E'\\\\', E'\\\\\\\\'), ',', E'\\\\,') || ',' || \
             replace(replace(r.\"no\"::text, E'\\\\', E'\\\\\\\\'), ',', E'\\\\,')"
        );
        // Columns not written back are subtracted, renamed ones added under
        // their field.
        let columns: Vec<String> = ["region", "no", "customer_id", "secret"]
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(
            data_expr("r", &columns, &side.fields),
            "(to_jsonb(r) - ARRAY['customer_id', 'secret']::text[]) || jsonb_build_object('customer', r.\"customer_id\")"
        );
        // An integral numeric is written without decimals, as key_text does.
        assert!(key_part("r", &col("n", "numeric")).contains("trunc(r.\"n\"::numeric)::text"));
    }
}
