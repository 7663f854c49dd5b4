//! Capture triggers on Oracle: one row-level `AFTER INSERT OR UPDATE OR
//! DELETE` trigger per table, `SITESYNC_CAP_<TABLE>`, in the table's
//! schema.
//!
//! It returns at once in the sink's sessions
//! (`SYS_CONTEXT('USERENV', 'CLIENT_IDENTIFIER') = 'sitesync'`, the marker
//! of [`super::target`]), and otherwise writes one outbox row per row with
//! `JSON_OBJECT(… NULL ON NULL RETURNING VARCHAR2(4000))` (Oracle 12.2+):
//! numbers as JSON numbers, `DATE` and `TIMESTAMP` as ISO 8601 without a
//! zone, `TIMESTAMP WITH [LOCAL] TIME ZONE` in UTC with `Z`. An UPDATE
//! that changes the key writes a delete of the old key first (when the
//! table has a delete route).
//!
//! Column names: an upper-case plain name (`NAME`) is the route's `name`,
//! as the sink resolves route names ([`super::target::oracle_ident`]).
//!
//! The fingerprint is in a comment of the trigger's body (`ALL_SOURCE`);
//! `ALL_TRIGGERS.STATUS` tells a disabled one. No Oracle runs on the CI
//! machines: the SQL is tested as text here, and on a real server by the
//! Docker-gated test in tests/flows/oracle.rs.

use super::conn::{OracleConnect, blocking, ident, literal, outbox_names};
use super::settings::{Settings, parse_oracle_url};
use super::target::{CLIENT_IDENTIFIER, oracle_ident};
use crate::capture::{
    Capture, Column, Generated, Installed, MARK, Plan, Side, Table, group_keys, object_name,
};
use crate::config::ConnectorConfig;
use crate::error::TargetError;

/// Oracle 12.2+ names are at most 128 bytes.
const NAME_MAX: usize = 128;

/// Capture on one Oracle schema.
pub struct OracleCapture {
    connect: OracleConnect,
    /// The connecting user, upper case: the default schema.
    user: String,
    sql: Triggers,
}

/// The SQL of the trigger (what the tests read, with no server).
pub struct Triggers {
    /// The outbox, quoted.
    outbox: String,
    /// The default schema.
    user: String,
}

impl OracleCapture {
    pub fn new(_cfg: &ConnectorConfig, db: &Settings) -> Result<OracleCapture, TargetError> {
        let connect = OracleConnect::new(db)?;
        let user = parse_oracle_url(&db.url)
            .map(|u| u.user.to_uppercase())
            .unwrap_or_default();
        let (schema, table) = outbox_names(&db.outbox_table, &user);
        Ok(OracleCapture {
            connect,
            sql: Triggers {
                outbox: format!("{}.{}", ident(&schema), ident(&table)),
                user: user.clone(),
            },
            user,
        })
    }

    /// Text rows of a query with binds.
    async fn rows(
        &self,
        sql: &'static str,
        binds: Vec<String>,
    ) -> Result<Vec<Vec<String>>, String> {
        let connect = self.connect.clone();
        blocking(move || {
            let conn = connect.connect()?;
            let params: Vec<&dyn oracle::sql_type::ToSql> = binds
                .iter()
                .map(|b| b as &dyn oracle::sql_type::ToSql)
                .collect();
            let rows = conn.query(sql, &params).map_err(|e| {
                crate::error::SourceError::transient(crate::error::Cause::Query, e.to_string())
            })?;
            let mut out = Vec::new();
            for row in rows {
                let row = row.map_err(|e| {
                    crate::error::SourceError::transient(crate::error::Cause::Query, e.to_string())
                })?;
                let mut cells = Vec::new();
                for i in 0..row.sql_values().len() {
                    cells.push(
                        row.get::<usize, Option<String>>(i)
                            .ok()
                            .flatten()
                            .unwrap_or_default(),
                    );
                }
                out.push(cells);
            }
            Ok(out)
        })
        .await
        .map_err(|e| e.to_string())
    }
}

/// The trigger of `table`, quoted and schema-qualified.
pub fn trigger_name(table: &str) -> String {
    let name = table.rsplit('.').next().unwrap_or(table).to_uppercase();
    object_name("SITESYNC_CAP_", &name, "", NAME_MAX)
}

/// The name a route uses for a column: the lower-case name that the sink
/// resolves to it ([`oracle_ident`]), or the name as it is.
pub fn route_name(column: &str) -> String {
    let lower = column.to_ascii_lowercase();
    if oracle_ident(&lower) == ident(column) {
        lower
    } else {
        column.to_string()
    }
}

/// A column's value in the event (`row` a prefix: `:NEW.`, `r.`).
pub fn value(row: &str, c: &Column) -> String {
    let v = format!("{row}{}", ident(&c.name));
    let ty = c.ty.as_str();
    if ty.contains("time zone") {
        format!("TO_CHAR(SYS_EXTRACT_UTC({v}), 'YYYY-MM-DD\"T\"HH24:MI:SS.FF6\"Z\"')")
    } else if ty.starts_with("timestamp") {
        format!("TO_CHAR({v}, 'YYYY-MM-DD\"T\"HH24:MI:SS.FF6')")
    } else if ty == "date" {
        format!("TO_CHAR({v}, 'YYYY-MM-DD\"T\"HH24:MI:SS')")
    } else {
        v
    }
}

/// One key part as text, the way `key_text` writes the column's JSON value.
fn key_part(row: &str, c: &Column) -> String {
    let v = format!("{row}{}", ident(&c.name));
    match c.ty.as_str() {
        "number" | "float" | "binary_float" | "binary_double" | "integer" => {
            format!("TO_CHAR({v}, 'TM9', 'NLS_NUMERIC_CHARACTERS=''.,''')")
        }
        "varchar2" | "nvarchar2" | "char" | "nchar" => v,
        _ => value(row, c),
    }
}

/// The entity key of the row `row` (a prefix: `:NEW.`, `r.`) as the
/// sink computes it from the event: shared by the trigger and resync.
pub fn key_expr(row: &str, side: &Side) -> String {
    side.key_sql(
        |c| key_part(row, c),
        |p| format!("REPLACE(REPLACE({p}, '\\', '\\\\'), ',', '\\,')"),
        " || ',' || ",
    )
}

/// The event's data of the row `row` (a prefix): a JSON object of its
/// fields, as the trigger writes it (shared with resync).
pub fn data_expr(row: &str, side: &Side) -> String {
    let pairs: Vec<String> = side
        .fields
        .iter()
        .map(|f| format!("{} VALUE {}", literal(&f.field), value(row, &f.column)))
        .collect();
    format!(
        "JSON_OBJECT({} NULL ON NULL RETURNING VARCHAR2(4000))",
        pairs.join(", ")
    )
}

impl Triggers {
    fn event(&self, side: &Side, row: &str) -> String {
        format!(
            "INSERT INTO {} (TYPE, ENTITY_KEY, DATA) VALUES ({}, {}, {});",
            self.outbox,
            literal(&side.kind),
            key_expr(row, side),
            data_expr(row, side)
        )
    }

    /// The trigger's statement.
    pub fn install(&self, plan: &Plan, fp: &str) -> Generated {
        if plan.upsert.is_none() && plan.delete.is_none() {
            return Generated {
                triggers: vec![],
                statements: vec![],
            };
        }
        let (owner, table) = outbox_names(&plan.table, &self.user);
        let name = trigger_name(&plan.table);
        let mut events = vec!["UPDATE"];
        let mut body = Vec::new();
        if let Some(d) = &plan.delete {
            events.push("DELETE");
            let same = d
                .key
                .iter()
                .map(|k| format!(":OLD.{q} = :NEW.{q}", q = ident(&k.name)))
                .collect::<Vec<_>>()
                .join(" AND ");
            body.push(format!(
                "IF DELETING OR (UPDATING AND NOT ({same})) THEN\n    {}\n  END IF;",
                self.event(d, ":OLD.")
            ));
        }
        if let Some(u) = &plan.upsert {
            events.insert(0, "INSERT");
            body.push(format!(
                "IF INSERTING OR UPDATING THEN\n    {}\n  END IF;",
                self.event(u, ":NEW.")
            ));
        }
        let statement = format!(
            "CREATE OR REPLACE TRIGGER {o}.{n}\nAFTER {} ON {o}.{t} FOR EACH ROW\nBEGIN\n  -- {MARK}{fp}: written by `sitesync capture add` for {}; do not edit (run it again)\n  IF SYS_CONTEXT('USERENV', 'CLIENT_IDENTIFIER') = {} THEN\n    RETURN;\n  END IF;\n  {}\nEND;",
            events.join(" OR "),
            plan.table,
            literal(CLIENT_IDENTIFIER),
            body.join("\n  "),
            o = ident(&owner),
            n = ident(&name),
            t = ident(&table),
        );
        Generated {
            triggers: vec![name],
            statements: vec![statement],
        }
    }

    pub fn remove(&self, table: &str, triggers: &[String]) -> Vec<String> {
        let (owner, _) = outbox_names(table, &self.user);
        triggers
            .iter()
            .map(|t| format!("DROP TRIGGER {}.{}", ident(&owner), ident(t)))
            .collect()
    }
}

impl Capture for OracleCapture {
    const FOLD_CASE: bool = true;

    async fn table(&self, table: &str) -> Result<Option<Table>, String> {
        let (owner, name) = outbox_names(table, &self.user);
        let rows = self
            .rows(
                "SELECT COLUMN_NAME, LOWER(DATA_TYPE), NVL(DATA_SCALE, 0), VIRTUAL_COLUMN FROM ALL_TAB_COLS \
                 WHERE OWNER = :1 AND TABLE_NAME = :2 AND HIDDEN_COLUMN = 'NO' ORDER BY COLUMN_ID",
                vec![owner.clone(), name.clone()],
            )
            .await
            .map_err(|e| format!("reading the columns of {table}: {e}"))?;
        if rows.is_empty() {
            return Ok(None);
        }
        let mut columns = Vec::new();
        let mut generated = Vec::new();
        for r in &rows {
            if r[3] == "YES" {
                generated.push(r[0].clone());
                continue;
            }
            // `TIMESTAMP(6) WITH TIME ZONE` → `timestamp(6) with time zone`.
            columns.push(Column {
                route_name: route_name(&r[0]),
                name: r[0].clone(),
                ty: r[1].clone(),
                scale: r[2].parse().unwrap_or(0),
            });
        }
        let keys = self
            .rows(
                "SELECT i.INDEX_NAME, c.COLUMN_NAME FROM ALL_INDEXES i JOIN ALL_IND_COLUMNS c \
                 ON c.INDEX_OWNER = i.OWNER AND c.INDEX_NAME = i.INDEX_NAME \
                 WHERE i.TABLE_OWNER = :1 AND i.TABLE_NAME = :2 AND i.UNIQUENESS = 'UNIQUE' ORDER BY i.INDEX_NAME, c.COLUMN_POSITION",
                vec![owner, name],
            )
            .await
            .map_err(|e| format!("reading the unique keys of {table}: {e}"))?;
        Ok(Some(Table {
            columns,
            generated,
            unique: group_keys(keys.into_iter().map(|r| (r[0].clone(), r[1].clone()))),
        }))
    }

    async fn installed(&self, table: &str) -> Result<Vec<Installed>, String> {
        let (owner, name) = outbox_names(table, &self.user);
        let triggers = self
            .rows(
                "SELECT TRIGGER_NAME, STATUS FROM ALL_TRIGGERS WHERE TABLE_OWNER = :1 AND TABLE_NAME = :2 \
                 AND TRIGGER_NAME LIKE 'SITESYNC\\_CAP\\_%' ESCAPE '\\'",
                vec![owner.clone(), name],
            )
            .await
            .map_err(|e| format!("reading the triggers of {table}: {e}"))?;
        let mut out = Vec::new();
        for t in triggers {
            let lines = self
                .rows(
                    "SELECT TEXT FROM ALL_SOURCE WHERE OWNER = :1 AND NAME = :2 AND TYPE = 'TRIGGER' ORDER BY LINE",
                    vec![owner.clone(), t[0].clone()],
                )
                .await?;
            out.push(Installed {
                name: t[0].clone(),
                definition: lines.into_iter().map(|l| l.concat()).collect(),
                enabled: t[1] == "ENABLED",
            });
        }
        Ok(out)
    }

    fn install(&self, plan: &Plan, fp: &str) -> Generated {
        self.sql.install(plan, fp)
    }

    fn remove(&self, table: &str, triggers: &[String]) -> Vec<String> {
        self.sql.remove(table, triggers)
    }

    async fn execute(&self, statements: &[String]) -> Result<(), String> {
        // DDL commits on its own; CREATE OR REPLACE swaps a trigger at once.
        let connect = self.connect.clone();
        let statements = statements.to_vec();
        blocking(move || {
            let conn = connect.connect()?;
            for s in &statements {
                conn.execute(s, &[]).map_err(|e| {
                    crate::error::SourceError::operator(
                        crate::error::Cause::Query,
                        format!("{e}\n  in: {s}"),
                    )
                })?;
            }
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{Spec, plan};
    use crate::config::{Operation, Route};
    use std::collections::BTreeMap;

    fn col(name: &str, ty: &str) -> Column {
        Column {
            name: name.into(),
            route_name: route_name(name),
            ty: ty.into(),
            scale: 0,
        }
    }

    fn fake() -> Triggers {
        Triggers {
            outbox: "\"APP\".\"OUTBOX\"".into(),
            user: "APP".into(),
        }
    }

    #[test]
    fn one_row_trigger_skips_the_sink_and_writes_deletes_before_upserts() {
        let up = Route {
            kind: "customer.upsert".into(),
            table: "customer".into(),
            key: vec!["id".into()],
            operation: Operation::Upsert,
            rename: BTreeMap::new(),
            drop: vec![],
            constants: BTreeMap::from([("origin_site".to_string(), serde_json::json!("x"))]),
        };
        let del = Route {
            kind: "customer.delete".into(),
            operation: Operation::Delete,
            constants: BTreeMap::new(),
            ..up.clone()
        };
        let table = Table {
            columns: vec![
                col("ID", "number"),
                col("NAME", "varchar2"),
                col("SEEN", "timestamp(6) with time zone"),
                col("ORIGIN_SITE", "varchar2"),
            ],
            generated: vec![],
            unique: vec![vec!["ID".into()]],
        };
        let p = plan(
            &Spec {
                table: "customer",
                upsert: Some(&up),
                delete: Some(&del),
            },
            &table,
            true,
        )
        .unwrap();
        let g = fake().install(&p, "00c0ffee");
        assert_eq!(g.triggers, vec!["SITESYNC_CAP_CUSTOMER"]);
        let sql = &g.statements[0];
        assert!(sql.starts_with("CREATE OR REPLACE TRIGGER \"APP\".\"SITESYNC_CAP_CUSTOMER\"\nAFTER INSERT OR UPDATE OR DELETE ON \"APP\".\"CUSTOMER\" FOR EACH ROW\nBEGIN\n"), "{sql}");
        assert!(sql.contains(&format!("{MARK}00c0ffee")), "{sql}");
        assert!(
            sql.contains(
                "IF SYS_CONTEXT('USERENV', 'CLIENT_IDENTIFIER') = 'sitesync' THEN\n    RETURN;"
            ),
            "{sql}"
        );
        let d = sql
            .find("IF DELETING OR (UPDATING AND NOT (:OLD.\"ID\" = :NEW.\"ID\")) THEN")
            .unwrap();
        let u = sql.find("IF INSERTING OR UPDATING THEN").unwrap();
        assert!(d < u, "{sql}");
        assert!(
            sql.contains("VALUES ('customer.upsert', TO_CHAR(:NEW.\"ID\", 'TM9', 'NLS_NUMERIC_CHARACTERS=''.,'''), JSON_OBJECT('id' VALUE :NEW.\"ID\", 'name' VALUE :NEW.\"NAME\", 'seen' VALUE TO_CHAR(SYS_EXTRACT_UTC(:NEW.\"SEEN\")"),
            "{sql}"
        );
        assert!(
            !sql.contains("origin_site"),
            "a constant column is the sink's: {sql}"
        );
        assert!(
            sql.contains(
                "JSON_OBJECT('id' VALUE :OLD.\"ID\" NULL ON NULL RETURNING VARCHAR2(4000))"
            ),
            "{sql}"
        );
        assert_eq!(
            fake().remove("customer", &g.triggers),
            vec!["DROP TRIGGER \"APP\".\"SITESYNC_CAP_CUSTOMER\""]
        );
    }

    #[test]
    fn upper_case_plain_names_are_the_routes_lower_case_ones() {
        assert_eq!(route_name("CUSTOMER_ID"), "customer_id");
        assert_eq!(route_name("MixedCase"), "MixedCase");
    }
}
