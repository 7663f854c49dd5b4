//! Capture by generated triggers: the outbox filled from business tables,
//! for applications that cannot write it themselves.
//!
//! For a table that a route of operation `upsert` writes, `sitesync capture
//! add` (or `sitesync init`, for routes that say `capture = true`) creates
//! triggers that write one outbox row per inserted or updated row, of the
//! route's type, in the same transaction as the change; when the table also
//! has a route of operation `delete`, deleted rows become events of that
//! type. Each event is what the route maps back to the row:
//!
//! - its `entity_key` is the route's key in the key format of
//!   [`crate::sink::mapping::key_text`] and [`join_key`](crate::sink::mapping::join_key);
//! - its `data` holds the row's columns under their field names, the
//!   inverse of the route: a renamed column under its field, a column the
//!   route fills with a constant or whose field it drops left out (a delete
//!   carries the key only).
//!
//! The triggers skip the sink's own transactions (each engine's session
//! marker), so an event applied here never comes back as a new one.
//!
//! This module is the engine-free part: which tables, the inverse mapping
//! ([`plan`]), the fingerprint that tells an out-of-date trigger, the
//! commands and what `check` reports. Each engine says it in SQL in its own
//! folder (`engine/<name>/capture.rs`), through [`Capture`].

use crate::checks::Check;
use crate::config::{ConnectorConfig, Operation, Route, SinkConfig};
use std::future::Future;

/// What every generated trigger body carries, followed by the fingerprint:
/// how `check` tells an out-of-date trigger.
pub const MARK: &str = "sitesync capture fp=";

/// A column of a business table, as its engine reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// The name in the database (what the trigger's SQL quotes).
    pub name: String,
    /// The name routes use for it: the same, except on Oracle where an
    /// upper-case plain name (`NAME`) is the route's `name`.
    pub route_name: String,
    /// The engine's type name, lower case (`int4`, `timestamptz`, `json`).
    pub ty: String,
    /// Digits after the decimal point, for exact numbers.
    pub scale: u32,
}

/// A business table: its columns (generated columns left out: the sink
/// cannot write them) and its unique keys (primary key included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    pub columns: Vec<Column>,
    /// Generated columns (database names): in a row, not in an event.
    pub generated: Vec<String>,
    /// Each unique key's columns (database names).
    pub unique: Vec<Vec<String>>,
}

/// Unique keys from catalog rows `(index, column)` in index and key
/// order: each index's columns.
pub fn group_keys(rows: impl IntoIterator<Item = (String, String)>) -> Vec<Vec<String>> {
    let mut unique: Vec<(String, Vec<String>)> = Vec::new();
    for (index, column) in rows {
        match unique.last_mut() {
            Some((i, cols)) if *i == index => cols.push(column),
            _ => unique.push((index, vec![column])),
        }
    }
    unique.into_iter().map(|(_, c)| c).collect()
}

/// A column in an event: where its value comes from and the field it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub column: Column,
    pub field: String,
}

/// One kind of event a table's triggers write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Side {
    /// The event type (the route's).
    pub kind: String,
    /// The key columns, in the route's order: the entity key.
    pub key: Vec<Column>,
    /// The event's data.
    pub fields: Vec<Field>,
}

impl Side {
    /// The SQL expression of the entity key, from each key column's text
    /// (`part`): that text alone for a one-column key; otherwise each
    /// part with `\` and `,` escaped by `escape`, joined by `join` (the
    /// engine's concatenation around a `,` literal), as the sink reads a
    /// composite key.
    pub fn key_sql(
        &self,
        part: impl Fn(&Column) -> String,
        escape: impl Fn(String) -> String,
        join: &str,
    ) -> String {
        if let [one] = self.key.as_slice() {
            return part(one);
        }
        self.key
            .iter()
            .map(|c| escape(part(c)))
            .collect::<Vec<_>>()
            .join(join)
    }
}

/// What the triggers of one table do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The table as the routes name it (`[schema.]table`).
    pub table: String,
    /// Every column of a row (database names), generated ones too.
    pub columns: Vec<String>,
    /// Inserted and updated rows (the upsert route).
    pub upsert: Option<Side>,
    /// Deleted rows, and the old row of an update that changes the key
    /// (the delete route).
    pub delete: Option<Side>,
}

/// A trigger of ours found on a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    pub name: String,
    /// Its body as the database keeps it (the fingerprint is in it).
    pub definition: String,
    pub enabled: bool,
}

/// The SQL that installs a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// The triggers it creates, by name.
    pub triggers: Vec<String>,
    /// The statements, in order.
    pub statements: Vec<String>,
}

/// What an engine provides for capture (`engine/<name>/capture.rs`).
pub trait Capture {
    /// Whether the engine compares names without case (MariaDB, SQL
    /// Server and Oracle do; PostgreSQL's quoted names do not).
    const FOLD_CASE: bool;

    /// The table's columns and unique keys; `None` when it does not exist.
    fn table(&self, table: &str) -> impl Future<Output = Result<Option<Table>, String>>;

    /// The capture triggers found on the table.
    fn installed(&self, table: &str) -> impl Future<Output = Result<Vec<Installed>, String>>;

    /// The statements that create the plan's triggers, replacing ours of
    /// the same names, each body carrying `MARK` and `fp`.
    fn install(&self, plan: &Plan, fp: &str) -> Generated;

    /// The statements that drop these triggers of ours (and what only
    /// they use).
    fn remove(&self, table: &str, triggers: &[String]) -> Vec<String>;

    /// Runs statements, in one transaction where the engine has
    /// transactional DDL.
    fn execute(&self, statements: &[String]) -> impl Future<Output = Result<(), String>>;
}

/// The routes of one table that capture uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spec<'a> {
    pub table: &'a str,
    pub upsert: Option<&'a Route>,
    pub delete: Option<&'a Route>,
}

impl Spec<'_> {
    /// The route types, for messages.
    pub fn kinds(&self) -> String {
        self.upsert
            .iter()
            .chain(self.delete.iter())
            .map(|r| r.kind.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The tables of the routes `chosen` picks, each with its upsert and
/// delete route (the table's, whichever of them was picked). A table with
/// two routes of one operation is refused: the trigger would not know
/// which type to write.
pub fn specs<'a>(
    sink: &'a SinkConfig,
    chosen: impl Fn(&Route) -> bool,
) -> Result<Vec<Spec<'a>>, String> {
    let mut tables: Vec<String> = Vec::new();
    for r in sink.routes.iter().filter(|r| chosen(r)) {
        if !tables.contains(&r.entity_table()) {
            tables.push(r.entity_table());
        }
    }
    let mut out = Vec::new();
    for table in tables {
        let of = |op: Operation| -> Result<Option<&'a Route>, String> {
            let found: Vec<&Route> = sink
                .routes
                .iter()
                .filter(|r| r.entity_table() == table && r.operation == op)
                .collect();
            match found.as_slice() {
                [] => Ok(None),
                [one] => Ok(Some(*one)),
                many => Err(format!(
                    "table {table} has {} {} routes ({}): capture needs one, to know which type to write",
                    many.len(),
                    if op == Operation::Upsert {
                        "upsert"
                    } else {
                        "delete"
                    },
                    many.iter()
                        .map(|r| r.kind.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            }
        };
        let upsert = of(Operation::Upsert)?;
        let delete = of(Operation::Delete)?;
        let first = upsert.or(delete).expect("a chosen route");
        out.push(Spec {
            table: &first.table,
            upsert,
            delete,
        });
    }
    Ok(out)
}

/// The tables named by `--route` types (or every route with `all`, or,
/// with neither, the routes that say `capture = true`).
pub fn chosen_specs<'a>(
    cfg: &'a ConnectorConfig,
    routes: &[String],
    all: bool,
) -> Result<Vec<Spec<'a>>, String> {
    for kind in routes {
        if cfg.sink.route(kind).is_none() {
            let known: Vec<&str> = cfg.sink.routes.iter().map(|r| r.kind.as_str()).collect();
            return Err(format!(
                "no route of {} has type `{kind}` (its routes: {})",
                cfg.file.display(),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ));
        }
    }
    if routes.is_empty() && !all && cfg.capture.is_empty() {
        return Err(format!(
            "no route chosen: name them with --route TYPE, take every route with --all, or set `capture = true` on routes in {}",
            cfg.file.display()
        ));
    }
    specs(&cfg.sink, |r| {
        all || routes.contains(&r.kind) || (routes.is_empty() && cfg.capture.contains(&r.kind))
    })
}

fn same(a: &str, b: &str, fold: bool) -> bool {
    if fold {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

/// The field a column's value goes under in `route`'s events, or `None`
/// when the route would not write it back to that column (a constant, a
/// dropped field, a field renamed to another column).
pub fn field_of(route: &Route, column: &str, fold: bool) -> Option<String> {
    if route.constants.keys().any(|c| same(c, column, fold)) {
        return None;
    }
    let field = match route.rename.iter().find(|(_, c)| same(c, column, fold)) {
        Some((field, _)) => field.clone(),
        None if route.rename.keys().any(|f| same(f, column, fold)) => return None,
        // A key column under the route's spelling of it.
        None => route
            .key
            .iter()
            .find(|k| same(k, column, fold))
            .cloned()
            .unwrap_or_else(|| column.to_string()),
    };
    if route.drop.iter().any(|d| same(d, &field, fold)) {
        return None;
    }
    Some(field)
}

/// One route's side of a plan: its key columns (which a unique key of the
/// table must match exactly) and its fields.
fn side(route: &Route, table: &Table, fold: bool, key_only: bool) -> Result<Side, String> {
    let find = |name: &str| {
        table
            .columns
            .iter()
            .find(|c| same(&c.route_name, name, fold))
    };
    let mut key = Vec::new();
    let mut missing = Vec::new();
    for k in &route.key {
        match find(k) {
            Some(c) => key.push(c.clone()),
            None => missing.push(k.as_str()),
        }
    }
    if !missing.is_empty() {
        return Err(format!(
            "{} has no column(s) {} (the key of route {})",
            route.table,
            missing.join(", "),
            route.kind
        ));
    }
    let matches = table.unique.iter().any(|u| {
        u.len() == key.len() && key.iter().all(|k| u.iter().any(|c| same(c, &k.name, fold)))
    });
    if !matches {
        return Err(format!(
            "{} has no primary key or unique index on exactly ({}), the key of route {}: capture needs one so that each row is one entity (add it, or fix the route's key)",
            route.table,
            route.key.join(", "),
            route.kind
        ));
    }
    let mut fields = Vec::new();
    for c in &table.columns {
        let in_key = key.iter().any(|k| k.name == c.name);
        if key_only && !in_key {
            continue;
        }
        match field_of(route, &c.route_name, fold) {
            Some(field) => fields.push(Field {
                column: c.clone(),
                field,
            }),
            None if in_key => {
                return Err(format!(
                    "route {} does not write its key column {} back (it is renamed away or dropped)",
                    route.kind, c.route_name
                ));
            }
            None => {}
        }
    }
    Ok(Side {
        kind: route.kind.clone(),
        key,
        fields,
    })
}

/// The plan of one table: what its triggers write, or why capture refuses
/// it.
pub fn plan(spec: &Spec<'_>, table: &Table, fold: bool) -> Result<Plan, String> {
    Ok(Plan {
        table: spec.table.to_string(),
        columns: table
            .columns
            .iter()
            .map(|c| c.name.clone())
            .chain(table.generated.iter().cloned())
            .collect(),
        upsert: spec
            .upsert
            .map(|r| side(r, table, fold, false))
            .transpose()?,
        delete: spec
            .delete
            .map(|r| side(r, table, fold, true))
            .transpose()?,
    })
}

/// The fingerprint of a plan's SQL: the statements generated without one,
/// hashed. A column added to the table, or a route changed, changes it.
pub fn fingerprint<C: Capture>(c: &C, plan: &Plan) -> String {
    let text = c.install(plan, "").statements.join("\n");
    format!("{:08x}", crc32fast::hash(text.as_bytes()))
}

/// The fingerprint a trigger body carries, if any.
pub fn carried(definition: &str) -> Option<&str> {
    let at = definition.find(MARK)? + MARK.len();
    let rest = &definition[at..];
    let end = rest
        .find(|c: char| !c.is_ascii_hexdigit())
        .unwrap_or(rest.len());
    Some(&rest[..end])
}

/// A name for a database object made of `prefix`, the table and `suffix`,
/// at most `max` bytes: a table name too long is cut and a hash of it
/// added, so that two tables never share a name.
pub fn object_name(prefix: &str, table: &str, suffix: &str, max: usize) -> String {
    let whole = format!("{prefix}{table}{suffix}");
    if whole.len() <= max {
        return whole;
    }
    let hash = format!("{:08x}", crc32fast::hash(table.as_bytes()));
    let room = max.saturating_sub(prefix.len() + suffix.len() + hash.len() + 1);
    let cut: String = table.chars().take(room).collect();
    format!("{prefix}{cut}_{hash}{suffix}")
}

/// How a table's capture stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// No trigger of ours on the table.
    Absent,
    /// Every trigger there, enabled, of the current fingerprint.
    Current,
    /// Something to do: each problem in words.
    Stale(Vec<String>),
}

/// Compares what is installed with what the plan generates.
pub fn state(expected: &Generated, fp: &str, installed: &[Installed]) -> State {
    if installed.is_empty() {
        return State::Absent;
    }
    let mut problems = Vec::new();
    for name in &expected.triggers {
        match installed.iter().find(|i| i.name.eq_ignore_ascii_case(name)) {
            None => problems.push(format!("trigger {name} is missing")),
            Some(i) if carried(&i.definition) != Some(fp) => problems.push(format!(
                "trigger {name} is out of date (the table or the route changed since it was made: fingerprint {} here, {fp} now)",
                carried(&i.definition).unwrap_or("none")
            )),
            Some(i) if !i.enabled => problems.push(format!("trigger {name} is disabled")),
            Some(_) => {}
        }
    }
    for i in installed {
        if !expected
            .triggers
            .iter()
            .any(|n| n.eq_ignore_ascii_case(&i.name))
        {
            problems.push(format!(
                "trigger {} is no longer wanted (the route it served is gone)",
                i.name
            ));
        }
    }
    if problems.is_empty() {
        State::Current
    } else {
        State::Stale(problems)
    }
}

/// What `capture` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Add { dry_run: bool },
    Remove { dry_run: bool },
    List,
}

/// A `sitesync capture` command on `c`: prints what it does; `Ok(false)`
/// when a table was refused.
pub async fn command<C: Capture>(
    c: &C,
    cfg: &ConnectorConfig,
    action: Action,
    routes: &[String],
    all: bool,
) -> Result<bool, String> {
    match action {
        Action::List => list(c, cfg).await,
        Action::Add { dry_run } => {
            let specs = chosen_specs(cfg, routes, all)?;
            let mut ok = true;
            for spec in &specs {
                match add(c, spec, dry_run).await {
                    Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
                    Err(e) => {
                        ok = false;
                        println!("{}: refused: {e}", spec.table);
                    }
                }
            }
            Ok(ok)
        }
        Action::Remove { dry_run } => {
            let specs = chosen_specs(cfg, routes, all)?;
            for spec in &specs {
                for l in remove(c, spec.table, dry_run).await? {
                    println!("{l}");
                }
            }
            Ok(true)
        }
    }
}

/// Creates (or brings up to date) the triggers of one table; lines to
/// print. With `dry_run`, the SQL instead, and nothing changes.
pub async fn add<C: Capture>(c: &C, spec: &Spec<'_>, dry_run: bool) -> Result<Vec<String>, String> {
    let table = c.table(spec.table).await?.ok_or_else(|| {
        format!(
            "table {} does not exist (routes {})",
            spec.table,
            spec.kinds()
        )
    })?;
    let plan = plan(spec, &table, C::FOLD_CASE)?;
    let fp = fingerprint(c, &plan);
    let generated = c.install(&plan, &fp);
    let installed = c.installed(spec.table).await?;
    let state = state(&generated, &fp, &installed);
    if state == State::Current {
        return Ok(vec![format!(
            "{}: capture up to date ({}), nothing to do",
            spec.table,
            describe(&plan)
        )]);
    }
    let unwanted: Vec<String> = installed
        .iter()
        .filter(|i| {
            !generated
                .triggers
                .iter()
                .any(|n| n.eq_ignore_ascii_case(&i.name))
        })
        .map(|i| i.name.clone())
        .collect();
    let mut statements = match unwanted.is_empty() {
        true => Vec::new(),
        false => c.remove(spec.table, &unwanted),
    };
    statements.extend(generated.statements.iter().cloned());
    if dry_run {
        let mut lines = vec![format!(
            "-- {}: {} (dry run: nothing changed)",
            spec.table,
            describe(&plan)
        )];
        lines.extend(statements.iter().map(|s| format!("{};\n", s.trim_end())));
        return Ok(lines);
    }
    c.execute(&statements).await?;
    Ok(vec![format!(
        "{}: capture {} ({}): triggers {}",
        spec.table,
        if state == State::Absent {
            "added"
        } else {
            "replaced"
        },
        describe(&plan),
        generated.triggers.join(", ")
    )])
}

/// Drops the triggers of ours on a table; lines to print.
pub async fn remove<C: Capture>(c: &C, table: &str, dry_run: bool) -> Result<Vec<String>, String> {
    let installed = c.installed(table).await?;
    if installed.is_empty() {
        return Ok(vec![format!("{table}: no capture trigger, nothing to do")]);
    }
    let names: Vec<String> = installed.iter().map(|i| i.name.clone()).collect();
    let statements = c.remove(table, &names);
    if dry_run {
        let mut lines = vec![format!(
            "-- {table}: remove capture (dry run: nothing changed)"
        )];
        lines.extend(statements.iter().map(|s| format!("{};\n", s.trim_end())));
        return Ok(lines);
    }
    c.execute(&statements).await?;
    Ok(vec![format!(
        "{table}: capture removed (triggers {})",
        names.join(", ")
    )])
}

/// What a plan writes, in words.
pub fn describe(plan: &Plan) -> String {
    let upsert = match &plan.upsert {
        Some(s) => format!("inserts and updates as {}", s.kind),
        None => "inserts and updates not captured (no upsert route)".to_string(),
    };
    let delete = match &plan.delete {
        Some(s) => format!("deletes as {}", s.kind),
        None => "deletes not captured (no delete route for this table)".to_string(),
    };
    format!("{upsert}; {delete}")
}

/// `capture list`: every routed table, whether capture is on, current,
/// wanted by the file.
async fn list<C: Capture>(c: &C, cfg: &ConnectorConfig) -> Result<bool, String> {
    let specs = specs(&cfg.sink, |_| true)?;
    if specs.is_empty() {
        println!("no routes in {}", cfg.file.display());
    }
    for spec in &specs {
        let wanted = wanted(cfg, spec);
        let (what, state) = match c.table(spec.table).await? {
            None => ("table does not exist".to_string(), None),
            Some(table) => match plan(spec, &table, C::FOLD_CASE) {
                Err(e) => (format!("cannot be captured: {e}"), None),
                Ok(plan) => {
                    let fp = fingerprint(c, &plan);
                    let g = c.install(&plan, &fp);
                    let installed = c.installed(spec.table).await?;
                    (describe(&plan), Some(state(&g, &fp, &installed)))
                }
            },
        };
        let state = match state {
            None => "-".to_string(),
            Some(State::Absent) => "not captured".to_string(),
            Some(State::Current) => "captured, up to date".to_string(),
            Some(State::Stale(p)) => format!("captured, needs `capture add`: {}", p.join("; ")),
        };
        println!(
            "{}  [{}]{}\n    {what}\n    {state}",
            spec.table,
            spec.kinds(),
            if wanted { "  (capture = true)" } else { "" }
        );
    }
    Ok(true)
}

/// Whether the connector file asks for this table's capture.
fn wanted(cfg: &ConnectorConfig, spec: &Spec<'_>) -> bool {
    spec.upsert
        .iter()
        .chain(spec.delete.iter())
        .any(|r| cfg.capture.contains(&r.kind))
}

/// `sitesync init`: the capture of the routes that say `capture = true`;
/// lines to print.
pub async fn configured<C: Capture>(c: &C, cfg: &ConnectorConfig) -> Result<Vec<String>, String> {
    let mut lines = Vec::new();
    for spec in specs(&cfg.sink, |r| cfg.capture.contains(&r.kind))? {
        lines.extend(
            add(c, &spec, false)
                .await
                .map_err(|e| format!("capture of {}: {e}", spec.table))?,
        );
    }
    Ok(lines)
}

/// What `sitesync check` reports: for each routed table with triggers of
/// ours or asked for by `capture = true`, whether they are there, enabled
/// and current.
pub async fn checks<C: Capture>(c: &C, cfg: &ConnectorConfig) -> Vec<Check> {
    let specs = match specs(&cfg.sink, |_| true) {
        Ok(s) => s,
        Err(e) => return vec![Check::fail("capture", e, "fix the routes")],
    };
    let mut out = Vec::new();
    for spec in &specs {
        out.extend(check_one(c, cfg, spec).await);
    }
    out
}

async fn check_one<C: Capture>(c: &C, cfg: &ConnectorConfig, spec: &Spec<'_>) -> Option<Check> {
    let name = format!("capture {}", spec.table);
    let fix = format!(
        "sitesync capture add --connector {} --route {}",
        cfg.file.display(),
        spec.upsert
            .or(spec.delete)
            .map(|r| r.kind.as_str())
            .unwrap_or_default()
    );
    let wanted = wanted(cfg, spec);
    // Unreadable (the database check says why): reported only when the
    // file asks for capture.
    let installed = match c.installed(spec.table).await {
        Ok(i) => i,
        Err(e) => {
            return wanted
                .then(|| Check::fail(name, e, "check database.url and the account's privileges"));
        }
    };
    if installed.is_empty() && !wanted {
        return None;
    }
    let table = match c.table(spec.table).await {
        Ok(Some(t)) => t,
        Ok(None) => {
            return wanted.then(|| {
                Check::fail(
                    name,
                    format!("table {} does not exist", spec.table),
                    "create the table, or fix the route",
                )
            });
        }
        Err(e) => {
            return Some(Check::fail(
                name,
                e,
                "check the database account's privileges",
            ));
        }
    };
    let plan = match plan(spec, &table, C::FOLD_CASE) {
        Ok(p) => p,
        Err(e) => return Some(Check::fail(name, e, "fix the table or the route")),
    };
    let fp = fingerprint(c, &plan);
    let generated = c.install(&plan, &fp);
    Some(match state(&generated, &fp, &installed) {
        State::Current => Check::pass(name, format!("{} (fingerprint {fp})", describe(&plan))),
        State::Absent => Check::fail(
            name,
            format!("`capture = true` but no trigger on {}", spec.table),
            fix,
        ),
        State::Stale(problems) => Check::fail(name, problems.join("; "), fix),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn col(name: &str, ty: &str) -> Column {
        Column {
            name: name.into(),
            route_name: name.into(),
            ty: ty.into(),
            scale: 0,
        }
    }

    fn route(kind: &str, table: &str, op: Operation) -> Route {
        Route {
            kind: kind.into(),
            table: table.into(),
            key: vec!["id".into()],
            operation: op,
            rename: BTreeMap::new(),
            drop: vec![],
            constants: BTreeMap::new(),
        }
    }

    fn table() -> Table {
        Table {
            columns: vec![
                col("id", "int4"),
                col("user_name", "text"),
                col("password", "text"),
                col("source", "text"),
                col("username", "text"),
                col("email", "text"),
            ],
            unique: vec![vec!["id".into()]],
            generated: vec![],
        }
    }

    fn fields(side: &Side) -> Vec<(&str, &str)> {
        side.fields
            .iter()
            .map(|f| (f.column.name.as_str(), f.field.as_str()))
            .collect()
    }

    #[test]
    fn the_event_is_the_inverse_of_the_route() {
        let mut up = route("user.upsert", "public.users", Operation::Upsert);
        up.rename = BTreeMap::from([("username".to_string(), "user_name".to_string())]);
        up.drop = vec!["password".into()];
        up.constants = BTreeMap::from([("source".to_string(), serde_json::json!("x"))]);
        let del = route("user.delete", "users", Operation::Delete);
        let spec = Spec {
            table: "public.users",
            upsert: Some(&up),
            delete: Some(&del),
        };
        let p = plan(&spec, &table(), false).unwrap();
        // user_name goes back as `username`; password (dropped), source (a
        // constant) and the column `username` (its field goes to
        // user_name) are left out.
        assert_eq!(
            fields(p.upsert.as_ref().unwrap()),
            vec![("id", "id"), ("user_name", "username"), ("email", "email")]
        );
        // A delete carries the key only.
        assert_eq!(fields(p.delete.as_ref().unwrap()), vec![("id", "id")]);
        // The mapping of such an event gives the row back.
        let data = serde_json::json!({"id": 1, "username": "zoe", "email": "z@e"});
        let row = crate::sink::mapping::map_row(&up, data.as_object().unwrap()).unwrap();
        assert_eq!(
            serde_json::Value::Object(row.columns),
            serde_json::json!({"id": 1, "user_name": "zoe", "email": "z@e", "source": "x"})
        );
    }

    #[test]
    fn a_table_without_a_matching_unique_key_or_key_column_is_refused() {
        let up = route("user.upsert", "users", Operation::Upsert);
        let spec = Spec {
            table: "users",
            upsert: Some(&up),
            delete: None,
        };
        let mut t = table();
        t.unique = vec![vec!["id".into(), "email".into()]];
        let e = plan(&spec, &t, false).unwrap_err();
        assert!(
            e.contains("no primary key or unique index on exactly (id)"),
            "{e}"
        );
        t.unique = vec![];
        assert!(plan(&spec, &t, false).is_err());
        t.unique = vec![vec!["ID".into()]];
        assert!(
            plan(&spec, &t, false).is_err(),
            "PostgreSQL names keep their case"
        );
        assert!(plan(&spec, &t, true).is_ok(), "MariaDB's do not");
        t.columns.remove(0);
        let e = plan(&spec, &t, true).unwrap_err();
        assert!(e.contains("has no column(s) id"), "{e}");
        let mut dropped = up.clone();
        dropped.drop = vec!["id".into()];
        let spec = Spec {
            upsert: Some(&dropped),
            ..spec
        };
        let e = plan(&spec, &table(), false).unwrap_err();
        assert!(e.contains("does not write its key column id back"), "{e}");
    }

    #[test]
    fn tables_are_chosen_with_both_their_routes() {
        let routes = vec![
            route("customer.upsert", "public.customer", Operation::Upsert),
            route("customer.delete", "customer", Operation::Delete),
            route("orders.upsert", "orders", Operation::Upsert),
        ];
        let sink = crate::sink::testing::sink_with(routes);
        let s = specs(&sink, |r| r.kind == "customer.delete").unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].upsert.unwrap().kind, "customer.upsert");
        assert_eq!(s[0].delete.unwrap().kind, "customer.delete");
        let s = specs(&sink, |_| true).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].delete, None);
        assert!(
            describe(&Plan {
                table: "orders".into(),
                columns: vec![],
                upsert: None,
                delete: None
            })
            .contains("no delete route for this table")
        );
        let mut twice = sink.clone();
        twice
            .routes
            .push(route("client.upsert", "customer", Operation::Upsert));
        let e = specs(&twice, |_| true).unwrap_err();
        assert!(
            e.contains("2 upsert routes (customer.upsert, client.upsert)"),
            "{e}"
        );
    }

    #[test]
    fn fingerprints_are_read_back_and_states_name_each_problem() {
        assert_eq!(
            carried("BEGIN -- sitesync capture fp=0a1b2c3d\n"),
            Some("0a1b2c3d")
        );
        assert_eq!(carried("BEGIN END"), None);
        let g = Generated {
            triggers: vec!["t_ins".into(), "t_del".into()],
            statements: vec![],
        };
        let ok = |name: &str| Installed {
            name: name.into(),
            definition: format!("x {MARK}00000001 y"),
            enabled: true,
        };
        assert_eq!(state(&g, "00000001", &[]), State::Absent);
        assert_eq!(
            state(&g, "00000001", &[ok("t_ins"), ok("T_DEL")]),
            State::Current
        );
        let State::Stale(p) = state(
            &g,
            "00000002",
            &[
                Installed {
                    enabled: false,
                    ..ok("t_ins")
                },
                ok("t_upd"),
            ],
        ) else {
            panic!()
        };
        assert!(p[0].contains("t_ins is out of date"), "{p:?}");
        assert!(p[1].contains("t_del is missing"), "{p:?}");
        assert!(p[2].contains("t_upd is no longer wanted"), "{p:?}");
        let State::Stale(p) = state(
            &g,
            "00000001",
            &[
                Installed {
                    enabled: false,
                    ..ok("t_ins")
                },
                ok("t_del"),
            ],
        ) else {
            panic!()
        };
        assert_eq!(p, vec!["trigger t_ins is disabled".to_string()]);
    }

    #[test]
    fn long_names_are_cut_and_stay_apart() {
        assert_eq!(
            object_name("sitesync_cap_", "customer", "_ins", 64),
            "sitesync_cap_customer_ins"
        );
        let a = object_name("sitesync_cap_", &"a".repeat(60), "_ins", 64);
        let b = object_name("sitesync_cap_", &format!("{}b", "a".repeat(59)), "_ins", 64);
        assert!(a.len() <= 64 && b.len() <= 64, "{a} {b}");
        assert_ne!(a, b);
    }
}
