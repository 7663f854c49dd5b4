//! Capture triggers on SQL Server: statement-level `AFTER` triggers that
//! read the `inserted` and `deleted` pseudo-tables.
//!
//! Each captured table gets up to three triggers in its schema,
//! `sitesync_cap_<table>_ins`, `_upd`, `_del` (`CREATE OR ALTER`, SQL
//! Server 2016 SP1+). Each writes its statement's events with one `INSERT …
//! SELECT` into the outbox, the data of each row built with `FOR JSON PATH,
//! WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES` (`datetimeoffset` as ISO
//! 8601 with its offset, `bit` as `true`/`false`, numbers as JSON numbers),
//! unless the session is the sink's
//! (`SESSION_CONTEXT(N'sitesync.applying') = 1`). An UPDATE writes a
//! delete for each old key that no new row holds (when the table has a
//! delete route), then an upsert for each new row; strings are compared
//! as bytes there, as entity keys are.
//!
//! The fingerprint is in a comment of each trigger's text
//! (`OBJECT_DEFINITION`); `sys.triggers.is_disabled` tells a disabled one.
//!
//! No SQL Server runs on the CI machines: the SQL is tested as text here,
//! and on a real server by the Docker-gated test in tests/flows/sqlserver.rs.

use super::conn::{self, literal, quote, quote_table};
use super::settings::Settings;
use crate::capture::{
    Capture, Column, Generated, Installed, MARK, Plan, Side, Table, group_keys, object_name,
};
use crate::config::ConnectorConfig;
use crate::error::TargetError;

/// SQL Server's names are at most 128 characters.
const NAME_MAX: usize = 128;

/// Capture on one SQL Server database.
pub struct MssqlCapture {
    db: Settings,
    sql: Triggers,
}

/// The SQL of the triggers (what the tests read, with no server).
pub struct Triggers {
    /// The outbox, quoted.
    outbox: String,
}

impl MssqlCapture {
    pub fn new(_cfg: &ConnectorConfig, db: &Settings) -> Result<MssqlCapture, TargetError> {
        let (schema, table) = db.outbox_parts();
        Ok(MssqlCapture {
            db: db.clone(),
            sql: Triggers {
                outbox: format!("{}.{}", quote(schema), quote(table)),
            },
        })
    }

    async fn client(&self) -> Result<conn::MssqlClient, String> {
        conn::connect(&self.db, "sitesync-capture")
            .await
            .map_err(|e| e.to_string())
    }

    /// Rows of a query as text cells.
    async fn rows(&self, sql: &str, table: &str) -> Result<Vec<Vec<Option<String>>>, String> {
        let mut client = self.client().await?;
        let quoted = quote_table(table);
        let rows = client
            .query(sql, &[&quoted.as_str()])
            .await
            .map_err(|e| e.to_string())?
            .into_first_result()
            .await
            .map_err(|e| e.to_string())?;
        Ok(rows
            .into_iter()
            .map(|r| {
                r.into_iter()
                    .map(|cell| super::types::cell_text(&cell).ok().flatten())
                    .collect()
            })
            .collect())
    }
}

/// The trigger of `table` for `op`, schema-qualified as the table is.
pub fn trigger_name(table: &str, op: &str) -> String {
    let name = table.rsplit('.').next().unwrap_or(table);
    object_name("sitesync_cap_", name, &format!("_{op}"), NAME_MAX)
}

fn trigger_ref(table: &str, name: &str) -> String {
    match table.split_once('.') {
        Some((s, _)) => format!("{}.{}", quote(s), quote(name)),
        None => quote(name),
    }
}

fn is_string(ty: &str) -> bool {
    matches!(
        ty,
        "char" | "varchar" | "nchar" | "nvarchar" | "text" | "ntext" | "sysname"
    )
}

/// One key part as text, the way `key_text` writes the column's JSON value.
fn key_part(row: &str, c: &Column) -> String {
    let v = format!("{row}.{}", quote(&c.name));
    match c.ty.as_str() {
        t if is_string(t) => v,
        "tinyint" | "smallint" | "int" | "bigint" => format!("CAST({v} AS nvarchar(20))"),
        "bit" => format!("CASE {v} WHEN 1 THEN N'true' WHEN 0 THEN N'false' END"),
        "decimal" | "numeric" | "money" | "smallmoney" => format!(
            "CASE WHEN {v} = FLOOR({v}) THEN CAST(CAST({v} AS decimal(38, 0)) AS nvarchar(40)) ELSE CAST({v} AS nvarchar(40)) END"
        ),
        "date" | "datetime" | "datetime2" | "smalldatetime" | "datetimeoffset" => {
            format!("CONVERT(nvarchar(40), {v}, 127)")
        }
        _ => format!("CONVERT(nvarchar(450), {v})"),
    }
}

/// The entity key of the row `row` (an alias: `r`, `inserted`) as the
/// sink computes it from the event: shared by the triggers and resync.
pub fn key_expr(row: &str, side: &Side) -> String {
    side.key_sql(
        |c| key_part(row, c),
        |p| format!("REPLACE(REPLACE({p}, N'\\', N'\\\\'), N',', N'\\,')"),
        " + N',' + ",
    )
}

/// The event's data of the row `row`: a JSON object of its fields, as
/// the triggers write it (shared with resync).
pub fn data_expr(row: &str, side: &Side) -> String {
    let cols: Vec<String> = side
        .fields
        .iter()
        .map(|f| format!("{row}.{} AS {}", quote(&f.column.name), quote(&f.field)))
        .collect();
    format!(
        "(SELECT {} FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES)",
        cols.join(", ")
    )
}

fn events(outbox: &str, side: &Side, from: &str, filter: &str) -> String {
    format!(
        "    INSERT INTO {outbox} ([type], [entity_key], [data])\n    SELECT {}, {}, {}\n    FROM {from} r{filter};\n",
        literal(&side.kind),
        key_expr("r", side),
        data_expr("r", side)
    )
}

impl Triggers {
    /// The body for `op`, or `None` when the plan writes nothing for it.
    pub fn body(&self, plan: &Plan, op: &str, fp: &str) -> Option<String> {
        let mut sql = String::new();
        match op {
            "ins" => sql.push_str(&events(&self.outbox, plan.upsert.as_ref()?, "inserted", "")),
            "upd" => {
                if plan.upsert.is_none() && plan.delete.is_none() {
                    return None;
                }
                if let Some(d) = &plan.delete {
                    let same = d
                        .key
                        .iter()
                        .map(|k| {
                            let q = quote(&k.name);
                            if is_string(&k.ty) {
                                format!(
                                    "CAST(n.{q} AS varbinary(max)) = CAST(r.{q} AS varbinary(max))"
                                )
                            } else {
                                format!("n.{q} = r.{q}")
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(" AND ");
                    let filter =
                        format!("\n    WHERE NOT EXISTS (SELECT 1 FROM inserted n WHERE {same})");
                    sql.push_str(&events(&self.outbox, d, "deleted", &filter));
                }
                if let Some(u) = &plan.upsert {
                    sql.push_str(&events(&self.outbox, u, "inserted", ""));
                }
            }
            _ => sql.push_str(&events(&self.outbox, plan.delete.as_ref()?, "deleted", "")),
        }
        Some(format!(
            "BEGIN\n    -- {MARK}{fp}: written by `sitesync capture add` for {}; do not edit (run it again)\n    SET NOCOUNT ON;\n    IF CAST(SESSION_CONTEXT(N'sitesync.applying') AS int) = 1 RETURN;\n{sql}END",
            plan.table
        ))
    }
}

impl Triggers {
    pub fn install(&self, plan: &Plan, fp: &str) -> Generated {
        let mut triggers = Vec::new();
        let mut statements = Vec::new();
        for (op, event) in [("ins", "INSERT"), ("upd", "UPDATE"), ("del", "DELETE")] {
            let Some(body) = self.body(plan, op, fp) else {
                continue;
            };
            let name = trigger_name(&plan.table, op);
            statements.push(format!(
                "CREATE OR ALTER TRIGGER {} ON {} AFTER {event} AS\n{body}",
                trigger_ref(&plan.table, &name),
                quote_table(&plan.table)
            ));
            // Enabled whatever state an existing trigger was in.
            statements.push(format!(
                "ENABLE TRIGGER {} ON {}",
                trigger_ref(&plan.table, &name),
                quote_table(&plan.table)
            ));
            triggers.push(name);
        }
        Generated {
            triggers,
            statements,
        }
    }

    pub fn remove(&self, table: &str, triggers: &[String]) -> Vec<String> {
        triggers
            .iter()
            .map(|t| format!("DROP TRIGGER IF EXISTS {}", trigger_ref(table, t)))
            .collect()
    }
}

impl Capture for MssqlCapture {
    const FOLD_CASE: bool = true;

    async fn table(&self, table: &str) -> Result<Option<Table>, String> {
        let rows = self
            .rows(
                "SELECT c.name, LOWER(t.name), CAST(c.scale AS int), CAST(c.is_computed AS int) FROM sys.columns c \
                 JOIN sys.types t ON t.user_type_id = c.user_type_id WHERE c.object_id = OBJECT_ID(@P1) ORDER BY c.column_id",
                table,
            )
            .await
            .map_err(|e| format!("reading the columns of {table}: {e}"))?;
        if rows.is_empty() {
            return Ok(None);
        }
        let cell =
            |r: &Vec<Option<String>>, i: usize| r.get(i).cloned().flatten().unwrap_or_default();
        let mut columns = Vec::new();
        let mut generated = Vec::new();
        for r in &rows {
            let name = cell(r, 0);
            if cell(r, 3) == "1" {
                generated.push(name);
                continue;
            }
            columns.push(Column {
                route_name: name.clone(),
                name,
                ty: cell(r, 1),
                scale: cell(r, 2).parse().unwrap_or(0),
            });
        }
        let keys = self
            .rows(
                "SELECT CAST(i.index_id AS int), c.name FROM sys.indexes i \
                 JOIN sys.index_columns ic ON ic.object_id = i.object_id AND ic.index_id = i.index_id \
                 JOIN sys.columns c ON c.object_id = ic.object_id AND c.column_id = ic.column_id \
                 WHERE i.object_id = OBJECT_ID(@P1) AND i.is_unique = 1 AND i.has_filter = 0 AND ic.is_included_column = 0 \
                 ORDER BY i.index_id, ic.key_ordinal",
                table,
            )
            .await
            .map_err(|e| format!("reading the unique keys of {table}: {e}"))?;
        Ok(Some(Table {
            columns,
            generated,
            unique: group_keys(keys.iter().map(|r| (cell(r, 0), cell(r, 1)))),
        }))
    }

    async fn installed(&self, table: &str) -> Result<Vec<Installed>, String> {
        let rows = self
            .rows(
                "SELECT tr.name, OBJECT_DEFINITION(tr.object_id), CAST(tr.is_disabled AS int) FROM sys.triggers tr \
                 WHERE tr.parent_id = OBJECT_ID(@P1) AND tr.name LIKE N'sitesync[_]cap[_]%'",
                table,
            )
            .await
            .map_err(|e| format!("reading the triggers of {table}: {e}"))?;
        Ok(rows
            .iter()
            .map(|r| Installed {
                name: r.first().cloned().flatten().unwrap_or_default(),
                definition: r.get(1).cloned().flatten().unwrap_or_default(),
                enabled: r.get(2).cloned().flatten().as_deref() != Some("1"),
            })
            .collect())
    }

    fn install(&self, plan: &Plan, fp: &str) -> Generated {
        self.sql.install(plan, fp)
    }

    fn remove(&self, table: &str, triggers: &[String]) -> Vec<String> {
        self.sql.remove(table, triggers)
    }

    async fn execute(&self, statements: &[String]) -> Result<(), String> {
        let mut client = self.client().await?;
        // Each CREATE TRIGGER must be alone in its batch; the transaction
        // spans them, so that a failure leaves the old triggers.
        async fn run(client: &mut conn::MssqlClient, sql: &str) -> Result<(), String> {
            client
                .simple_query(sql)
                .await
                .map_err(|e| e.to_string())?
                .into_results()
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        }
        run(&mut client, "BEGIN TRANSACTION").await?;
        for s in statements {
            if let Err(e) = run(&mut client, s).await {
                let _ = run(&mut client, "IF @@TRANCOUNT > 0 ROLLBACK").await;
                return Err(format!("{e}\n  in: {s}"));
            }
        }
        run(&mut client, "COMMIT").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::{Field, Spec, plan};
    use crate::config::{Operation, Route};
    use std::collections::BTreeMap;

    fn col(name: &str, ty: &str) -> Column {
        Column {
            name: name.into(),
            route_name: name.into(),
            ty: ty.into(),
            scale: 0,
        }
    }

    /// The triggers' SQL, with no server.
    fn fake() -> Triggers {
        Triggers {
            outbox: "[dbo].[outbox]".into(),
        }
    }

    fn customer_plan() -> Plan {
        let up = Route {
            kind: "customer.upsert".into(),
            table: "dbo.customer".into(),
            key: vec!["id".into()],
            operation: Operation::Upsert,
            rename: BTreeMap::from([("full_name".to_string(), "name".to_string())]),
            drop: vec![],
            constants: BTreeMap::new(),
        };
        let del = Route {
            kind: "customer.delete".into(),
            operation: Operation::Delete,
            rename: BTreeMap::new(),
            ..up.clone()
        };
        let table = Table {
            columns: vec![
                col("ID", "int"),
                col("Name", "nvarchar"),
                col("seen", "datetimeoffset"),
            ],
            generated: vec!["upper_name".into()],
            unique: vec![vec!["ID".into()]],
        };
        plan(
            &Spec {
                table: "dbo.customer",
                upsert: Some(&up),
                delete: Some(&del),
            },
            &table,
            true,
        )
        .unwrap()
    }

    #[test]
    fn statement_triggers_read_the_pseudo_tables_and_skip_the_sink() {
        let c = fake();
        let p = customer_plan();
        let g = c.install(&p, "0badcafe");
        assert_eq!(
            g.triggers,
            vec![
                "sitesync_cap_customer_ins",
                "sitesync_cap_customer_upd",
                "sitesync_cap_customer_del"
            ]
        );
        let [ins, enable, upd, _, del, _] = &g.statements[..] else {
            panic!("{g:?}")
        };
        assert_eq!(
            enable,
            "ENABLE TRIGGER [dbo].[sitesync_cap_customer_ins] ON [dbo].[customer]"
        );
        assert!(ins.starts_with("CREATE OR ALTER TRIGGER [dbo].[sitesync_cap_customer_ins] ON [dbo].[customer] AFTER INSERT AS\nBEGIN\n"), "{ins}");
        assert!(ins.contains(&format!("{MARK}0badcafe")), "{ins}");
        assert!(
            ins.contains("IF CAST(SESSION_CONTEXT(N'sitesync.applying') AS int) = 1 RETURN;"),
            "{ins}"
        );
        assert!(
            ins.contains("SELECT N'customer.upsert', CAST(r.[ID] AS nvarchar(20)), (SELECT r.[ID] AS [id], r.[Name] AS [full_name], r.[seen] AS [seen] FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES)\n    FROM inserted r;"),
            "{ins}"
        );
        // An update: the old keys no new row holds are deletes, first.
        let d = upd.find("N'customer.delete'").unwrap();
        let u = upd.find("N'customer.upsert'").unwrap();
        assert!(d < u, "{upd}");
        assert!(upd.contains("FROM deleted r\n    WHERE NOT EXISTS (SELECT 1 FROM inserted n WHERE n.[ID] = r.[ID])"), "{upd}");
        assert!(
            del.contains("(SELECT r.[ID] AS [id] FOR JSON PATH"),
            "a delete carries the key: {del}"
        );
        assert!(
            !g.statements.concat().contains("upper_name"),
            "generated columns are not in events"
        );
        assert_eq!(
            c.remove("dbo.customer", &["sitesync_cap_customer_del".into()]),
            vec!["DROP TRIGGER IF EXISTS [dbo].[sitesync_cap_customer_del]"]
        );
    }

    #[test]
    fn composite_string_keys_are_escaped_and_compared_as_bytes() {
        let side = Side {
            kind: "t.delete".into(),
            key: vec![col("a", "nvarchar"), col("b", "bigint")],
            fields: vec![Field {
                column: col("a", "nvarchar"),
                field: "a".into(),
            }],
        };
        assert_eq!(
            key_expr("r", &side),
            "REPLACE(REPLACE(r.[a], N'\\', N'\\\\'), N',', N'\\,') + N',' + REPLACE(REPLACE(CAST(r.[b] AS nvarchar(20)), N'\\', N'\\\\'), N',', N'\\,')"
        );
        let p = Plan {
            table: "t".into(),
            columns: vec!["a".into(), "b".into()],
            upsert: None,
            delete: Some(side),
        };
        let upd = fake().body(&p, "upd", "1").unwrap();
        assert!(
            upd.contains(
                "CAST(n.[a] AS varbinary(max)) = CAST(r.[a] AS varbinary(max)) AND n.[b] = r.[b]"
            ),
            "{upd}"
        );
        assert_eq!(
            fake().body(&p, "ins", "1"),
            None,
            "no upsert route, no insert trigger"
        );
    }
}
