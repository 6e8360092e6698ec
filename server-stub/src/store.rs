//! SQLite persistence (WAL): the one module that speaks SQL.
//!
//! Records are stored as JSON documents keyed by id (the server's records evolve with
//! the proto; a document column keeps old rows readable through serde defaults).
//! Events, signals and provider records are append-only tables queried directly.
//! Every call runs on the blocking pool, never on the async runtime's workers.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use powernode_proto::admin::{Event, Signal};
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use crate::clock::{format_ts, Millis};
use crate::images::Publication;
use crate::model::{CertRec, InstRec, Mem, NodeRec, Op, TaskRec, TokenRec};

pub const DB_FILE: &str = "powernode.sqlite";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("SQLite error")]
    Sql(#[from] rusqlite::Error),
    #[error("stored {table} row {id} is not valid JSON")]
    Corrupt {
        table: &'static str,
        id: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode a record")]
    Encode(#[source] serde_json::Error),
    #[error("store worker failed")]
    Join(#[source] tokio::task::JoinError),
    #[error("store mutex poisoned")]
    Poisoned,
    #[error(
        "the database has schema version {found}, newer than this server knows ({known}): \
         run the newer server"
    )]
    NewerSchema { found: i64, known: i64 },
    #[error("cannot make {path} private (0600)")]
    Private {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS nodes (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (id TEXT PRIMARY KEY, node_id TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (id TEXT PRIMARY KEY, instance_id TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, instance_id TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS certs (serial TEXT PRIMARY KEY, instance_id TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, kind TEXT NOT NULL,
    node_id TEXT, instance_id TEXT, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_instance ON events (instance_id, id);
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, at_ms);
CREATE TABLE IF NOT EXISTS signals (id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, kind TEXT NOT NULL,
    instance_id TEXT NOT NULL, active INTEGER NOT NULL, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS signals_instance ON signals (instance_id, id);
CREATE TABLE IF NOT EXISTS provider_records (id INTEGER PRIMARY KEY AUTOINCREMENT, instance_id TEXT NOT NULL,
    action TEXT NOT NULL, at_ms INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS provider_records_instance ON provider_records (instance_id, id);
CREATE TABLE IF NOT EXISTS disk_image_publications (id TEXT PRIMARY KEY, created_ms INTEGER NOT NULL,
    doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS module_publications (id TEXT PRIMARY KEY, created_ms INTEGER NOT NULL,
    doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS template_modules (template_id TEXT PRIMARY KEY, doc TEXT NOT NULL);
"#;

/// Schema changes after [`SCHEMA`], oldest first; `PRAGMA user_version` counts those
/// a database has had. Each runs once, with the version bump, in one transaction, so
/// a data directory from before a change opens and is upgraded in place (a new column
/// is NULL in old rows). Append, never edit or reorder.
const MIGRATIONS: &[&str] = &[
    // 1: the PEM of a certificate issued at enrollment, so a node whose answer was
    // lost gets the same certificate when it asks again (not kept in memory).
    "ALTER TABLE certs ADD COLUMN pem TEXT",
    // 2: provision records keep no bootstrap token in clear (new ones keep its hash;
    // the document itself lives in DIR/identities/ while the instance does).
    "UPDATE provider_records SET doc = json_set(doc, '$.identity.bootstrap_token', '(not kept)') \
     WHERE json_type(doc, '$.identity.bootstrap_token') = 'text' \
     AND json_extract(doc, '$.identity.bootstrap_token') != '(not kept)'",
];

/// Brings the schema up to [`MIGRATIONS`]; refuses a database a newer server wrote.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let known = MIGRATIONS.len() as i64;
    for (applied, sql) in (1..).zip(MIGRATIONS) {
        // IMMEDIATE: two servers opening one directory do not both run a step.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > known {
            return Err(StoreError::NewerSchema {
                found: version,
                known,
            });
        }
        if version < applied {
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", applied)?;
            tx.commit()?;
        }
    }
    Ok(())
}

fn enc<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(StoreError::Encode)
}

/// Creates `path` 0600 if it is missing, or narrows it to 0600: the database holds
/// token hashes, certificates and everything the admin API shows.
fn make_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let private = |source| StoreError::Private {
        path: path.to_path_buf(),
        source,
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(private)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(private)
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(DB_FILE);
        make_private(&path)?;
        let mut conn = Connection::open(&path).map_err(|source| StoreError::Open {
            path: path.clone(),
            source,
        })?;
        // WAL, so readers never block the writer; FULL, so a commit is fsynced before
        // it is answered: a token spent, a certificate issued or revoked survives a
        // power cut, not only a killed process (NORMAL's promise).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(SCHEMA)?;
        migrate(&mut conn)?;
        // SQLite gives its WAL and shared-memory files the database's mode; ones left
        // by an older server keep theirs.
        for suffix in ["-wal", "-shm"] {
            let side = dir.join(format!("{DB_FILE}{suffix}"));
            if side.exists() {
                make_private(&side)?;
            }
        }
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
        f(&mut conn)
    }

    /// Runs `f` on the blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.with_conn(f))
            .await
            .map_err(StoreError::Join)?
    }

    /// Reads every record into a fresh [`Mem`] (at start).
    pub fn load(&self) -> Result<Mem, StoreError> {
        self.with_conn(|conn| {
            let mut mem = Mem::default();
            for n in load_docs::<NodeRec>(conn, "nodes", "id")? {
                mem.nodes.insert(n.id.clone(), n);
            }
            for i in load_docs::<InstRec>(conn, "instances", "id")? {
                mem.instances.insert(i.id.clone(), i);
            }
            for t in load_docs::<TaskRec>(conn, "tasks", "id")? {
                mem.tasks.insert(t.id.clone(), t);
            }
            for t in load_docs::<TokenRec>(conn, "tokens", "hash")? {
                mem.tokens.insert(t.hash.clone(), t);
            }
            for c in load_docs::<CertRec>(conn, "certs", "serial")? {
                mem.certs.insert(c.serial.clone(), c);
            }
            mem.next_event_id =
                conn.query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))?;
            mem.next_signal_id =
                conn.query_row("SELECT COALESCE(MAX(id), 0) FROM signals", [], |r| r.get(0))?;
            Ok(mem)
        })
    }

    /// Writes `ops` in one transaction.
    pub async fn apply(&self, ops: Vec<Op>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.blocking(move |conn| apply_ops(conn, &ops)).await
    }

    /// The same, on the calling thread (shutdown and tests).
    pub fn apply_blocking(&self, ops: &[Op]) -> Result<(), StoreError> {
        self.with_conn(|conn| apply_ops(conn, ops))
    }

    /// Deletes what the retention let go, in one transaction with `ops` (the instance
    /// records whose task lists lose pruned tasks): the named tasks and certificates,
    /// events older than `cutoff`, and inactive signals older than it. The newest event
    /// and signal always stay, so ids never go back after a restart (`load` continues
    /// from the largest id, and readers page by id).
    pub async fn prune(
        &self,
        cutoff: Millis,
        ops: Vec<Op>,
        tasks: Vec<String>,
        certs: Vec<String>,
    ) -> Result<PruneCounts, StoreError> {
        self.blocking(move |conn| {
            let tx = conn.transaction()?;
            let mut counts = PruneCounts::default();
            {
                let mut del = tx.prepare_cached("DELETE FROM tasks WHERE id = ?1")?;
                for id in &tasks {
                    counts.tasks += del.execute(params![id])?;
                }
                let mut del = tx.prepare_cached("DELETE FROM certs WHERE serial = ?1")?;
                for serial in &certs {
                    counts.certs += del.execute(params![serial])?;
                }
            }
            counts.events = tx.execute(
                "DELETE FROM events WHERE at_ms < ?1 AND id < (SELECT MAX(id) FROM events)",
                params![cutoff],
            )?;
            counts.signals = tx.execute(
                "DELETE FROM signals WHERE at_ms < ?1 AND active = 0
                 AND id < (SELECT MAX(id) FROM signals)",
                params![cutoff],
            )?;
            write_ops(&tx, &ops)?;
            tx.commit()?;
            Ok(counts)
        })
        .await
    }

    /// The PEM recorded for a certificate issued at enrollment (`None`: unknown, or
    /// issued another way or before the PEM was kept).
    pub async fn cert_pem(&self, serial: String) -> Result<Option<String>, StoreError> {
        self.blocking(move |conn| {
            let pem: Option<Option<String>> = conn
                .query_row(
                    "SELECT pem FROM certs WHERE serial = ?1",
                    params![serial],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(pem.flatten())
        })
        .await
    }

    pub async fn recent_events(
        &self,
        limit: u32,
        instance_id: Option<String>,
    ) -> Result<Vec<Event>, StoreError> {
        self.blocking(move |conn| {
            let mut out = Vec::new();
            let mut stmt = conn.prepare_cached(
                "SELECT id, at_ms, kind, node_id, instance_id, detail FROM events
                 WHERE (?1 IS NULL OR instance_id = ?1) ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![instance_id, limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })?;
            for row in rows {
                let (id, at_ms, kind, node_id, instance_id, detail) = row?;
                out.push(Event {
                    id,
                    at: format_ts(at_ms),
                    kind,
                    node_id,
                    instance_id,
                    detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                });
            }
            Ok(out)
        })
        .await
    }

    /// `(at_ms, detail)` of the events (`signals: false`) or signals of one kind in
    /// `[since_ms, until_ms]`, optionally of one instance, oldest first.
    pub async fn kind_between(
        &self,
        signals: bool,
        kind: &'static str,
        instance_id: Option<String>,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<(i64, serde_json::Value)>, StoreError> {
        self.blocking(move |conn| {
            let sql = if signals {
                "SELECT at_ms, detail FROM signals WHERE kind = ?1
                 AND (?2 IS NULL OR instance_id = ?2) AND at_ms BETWEEN ?3 AND ?4
                 ORDER BY id LIMIT 10000"
            } else {
                "SELECT at_ms, detail FROM events WHERE kind = ?1
                 AND (?2 IS NULL OR instance_id = ?2) AND at_ms BETWEEN ?3 AND ?4
                 ORDER BY id LIMIT 10000"
            };
            let mut stmt = conn.prepare_cached(sql)?;
            let rows = stmt.query_map(params![kind, instance_id, since_ms, until_ms], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (at, detail) = row?;
                out.push((
                    at,
                    serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                ));
            }
            Ok(out)
        })
        .await
    }

    pub async fn recent_signals(
        &self,
        limit: u32,
        instance_id: Option<String>,
    ) -> Result<Vec<Signal>, StoreError> {
        self.blocking(move |conn| {
            let mut out = Vec::new();
            let mut stmt = conn.prepare_cached(
                "SELECT id, at_ms, kind, instance_id, active, detail FROM signals
                 WHERE (?1 IS NULL OR instance_id = ?1) ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![instance_id, limit], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, bool>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })?;
            for row in rows {
                let (id, at_ms, kind, instance_id, active, detail) = row?;
                out.push(Signal {
                    id,
                    kind,
                    instance_id,
                    at: format_ts(at_ms),
                    active,
                    detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
                });
            }
            Ok(out)
        })
        .await
    }

    /// Every netboot image publication, oldest first.
    pub fn load_publications(&self) -> Result<Vec<Publication>, StoreError> {
        self.with_conn(|conn| {
            let mut v = load_docs::<Publication>(conn, "disk_image_publications", "id")?;
            v.sort_by_key(|p| p.created_ms);
            Ok(v)
        })
    }

    pub async fn insert_publication(&self, p: Publication) -> Result<(), StoreError> {
        self.blocking(move |conn| {
            conn.execute(
                "INSERT INTO disk_image_publications (id, created_ms, doc) VALUES (?1, ?2, ?3)",
                params![p.id, p.created_ms, enc(&p)?],
            )?;
            Ok(())
        })
        .await
    }

    /// Every module publication, oldest first.
    pub fn load_module_publications(
        &self,
    ) -> Result<Vec<crate::model::ModulePublication>, StoreError> {
        self.with_conn(|conn| {
            let mut v =
                load_docs::<crate::model::ModulePublication>(conn, "module_publications", "id")?;
            v.sort_by_key(|p| p.created_ms);
            Ok(v)
        })
    }

    pub async fn insert_module_publication(
        &self,
        p: crate::model::ModulePublication,
    ) -> Result<(), StoreError> {
        self.blocking(move |conn| {
            conn.execute(
                "INSERT INTO module_publications (id, created_ms, doc) VALUES (?1, ?2, ?3)",
                params![p.id, p.created_ms, enc(&p)?],
            )?;
            Ok(())
        })
        .await
    }

    /// Module lists set on templates (overriding the built-in catalog's).
    pub fn load_template_modules(&self) -> Result<Vec<crate::model::TemplateModules>, StoreError> {
        self.with_conn(|conn| load_docs(conn, "template_modules", "template_id"))
    }

    pub async fn save_template_modules(
        &self,
        t: crate::model::TemplateModules,
    ) -> Result<(), StoreError> {
        self.blocking(move |conn| {
            conn.execute(
                "INSERT OR REPLACE INTO template_modules (template_id, doc) VALUES (?1, ?2)",
                params![t.template_id, enc(&t)?],
            )?;
            Ok(())
        })
        .await
    }

    /// The newest provider record of `action` for an instance.
    pub async fn provider_record(
        &self,
        instance_id: String,
        action: &'static str,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        self.blocking(move |conn| provider_record_in(conn, instance_id, action))
            .await
    }

    /// [`Store::provider_record`] on the calling thread (start-up).
    pub fn provider_record_blocking(
        &self,
        instance_id: &str,
        action: &'static str,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        let id = instance_id.to_string();
        self.with_conn(move |conn| provider_record_in(conn, id, action))
    }
}

fn provider_record_in(
    conn: &mut Connection,
    instance_id: String,
    action: &'static str,
) -> Result<Option<serde_json::Value>, StoreError> {
    {
        {
            let doc: Option<String> = conn
                .query_row(
                    "SELECT doc FROM provider_records WHERE instance_id = ?1 AND action = ?2
                     ORDER BY id DESC LIMIT 1",
                    params![instance_id, action],
                    |r| r.get(0),
                )
                .optional()?;
            doc.map(|d| {
                serde_json::from_str(&d).map_err(|source| StoreError::Corrupt {
                    table: "provider_records",
                    id: instance_id.clone(),
                    source,
                })
            })
            .transpose()
        }
    }
}

fn load_docs<T: serde::de::DeserializeOwned>(
    conn: &Connection,
    table: &'static str,
    key: &str,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare(&format!("SELECT {key}, doc FROM {table}"))?;
    let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
    let mut out = Vec::new();
    for row in rows {
        let (id, doc) = row?;
        out.push(
            serde_json::from_str(&doc).map_err(|source| StoreError::Corrupt {
                table,
                id,
                source,
            })?,
        );
    }
    Ok(out)
}

fn apply_ops(conn: &mut Connection, ops: &[Op]) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    write_ops(&tx, ops)?;
    tx.commit()?;
    Ok(())
}

fn write_ops(tx: &rusqlite::Transaction<'_>, ops: &[Op]) -> Result<(), StoreError> {
    for op in ops {
        match op {
            Op::Node(n) => {
                tx.prepare_cached("INSERT OR REPLACE INTO nodes (id, doc) VALUES (?1, ?2)")?
                    .execute(params![n.id, enc(n)?])?;
            }
            Op::DeleteNode(id) => {
                tx.prepare_cached("DELETE FROM nodes WHERE id = ?1")?
                    .execute(params![id])?;
            }
            Op::Instance(i) => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO instances (id, node_id, doc) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![i.id, i.node_id, enc(i)?])?;
            }
            Op::Task(t) => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO tasks (id, instance_id, doc) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![t.id, t.instance_id, enc(t)?])?;
            }
            Op::Token(t) => {
                tx.prepare_cached(
                    "INSERT OR REPLACE INTO tokens (hash, instance_id, doc) VALUES (?1, ?2, ?3)",
                )?
                .execute(params![t.hash, t.instance_id, enc(t)?])?;
            }
            Op::Cert(c) => {
                // An upsert, not a replace: a revocation keeps the stored PEM.
                tx.prepare_cached(
                    "INSERT INTO certs (serial, instance_id, doc) VALUES (?1, ?2, ?3)
                     ON CONFLICT (serial) DO UPDATE
                     SET instance_id = excluded.instance_id, doc = excluded.doc",
                )?
                .execute(params![c.serial, c.instance_id, enc(c)?])?;
            }
            Op::CertPem { serial, pem } => {
                tx.prepare_cached("UPDATE certs SET pem = ?2 WHERE serial = ?1")?
                    .execute(params![serial, pem])?;
            }
            Op::Event(e) => {
                tx.prepare_cached(
                    "INSERT INTO events (id, at_ms, kind, node_id, instance_id, detail)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    e.id,
                    e.at_ms,
                    e.kind,
                    e.node_id,
                    e.instance_id,
                    enc(&e.detail)?
                ])?;
            }
            Op::Signal(s) => {
                tx.prepare_cached(
                    "INSERT INTO signals (id, at_ms, kind, instance_id, active, detail)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    s.id,
                    s.at_ms,
                    s.kind,
                    s.instance_id,
                    s.active,
                    enc(&s.detail)?
                ])?;
            }
            Op::SignalActive { id, active } => {
                tx.prepare_cached("UPDATE signals SET active = ?2 WHERE id = ?1")?
                    .execute(params![id, active])?;
            }
            Op::ProviderRecord {
                instance_id,
                action,
                at_ms,
                doc,
            } => {
                tx.prepare_cached(
                    "INSERT INTO provider_records (instance_id, action, at_ms, doc)
                     VALUES (?1, ?2, ?3, ?4)",
                )?
                .execute(params![instance_id, action, at_ms, enc(doc)?])?;
            }
        }
    }
    Ok(())
}

/// Rows [`Store::prune`] deleted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PruneCounts {
    pub tasks: usize,
    pub certs: usize,
    pub events: usize,
    pub signals: usize,
}

impl PruneCounts {
    pub fn total(&self) -> usize {
        self.tasks + self.certs + self.events + self.signals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_and_its_wal_are_readable_by_the_server_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join(DB_FILE);
        let store = Store::open(dir.path()).unwrap();
        store
            .apply_blocking(&[Op::Event(crate::model::NewEvent {
                id: 1,
                at_ms: 1,
                kind: "x".into(),
                node_id: None,
                instance_id: None,
                detail: serde_json::json!({}),
            })])
            .unwrap();
        assert_eq!(mode(&db), 0o600);
        assert_eq!(mode(&dir.path().join(format!("{DB_FILE}-wal"))), 0o600);
        drop(store);
        // An older server's world-readable files are narrowed at the next start.
        for f in [DB_FILE.to_string(), format!("{DB_FILE}-wal")] {
            let p = dir.path().join(f);
            if p.exists() {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
            }
        }
        let _store = Store::open(dir.path()).unwrap();
        assert_eq!(mode(&db), 0o600);
    }

    /// A data directory from before the `certs.pem` column: it opens, its rows load,
    /// an enrollment's PEM is kept, a revocation keeps it, and a database from a newer
    /// server is refused rather than misread.
    #[tokio::test]
    async fn an_old_data_directory_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        {
            let old = Connection::open(dir.path().join(DB_FILE)).unwrap();
            old.execute_batch(SCHEMA).unwrap();
            old.execute_batch(
                r#"INSERT INTO certs (serial, instance_id, doc) VALUES ('01', 'inst-1',
                   '{"serial":"01","instance_id":"inst-1","issued_ms":1,"not_after_ms":2,"revoked":false}');
                   INSERT INTO tokens (hash, instance_id, doc) VALUES ('h', 'inst-1',
                   '{"hash":"h","instance_id":"inst-1","node_id":"n","created_ms":1,"used_ms":1}');
                   INSERT INTO provider_records (instance_id, action, at_ms, doc) VALUES ('inst-1',
                   'provision', 1, '{"provider":"real","identity":{"bootstrap_token":"s3cret","node_id":"n"}}');"#,
            )
            .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        // The token an older server kept in clear is gone from its record.
        let rec = store
            .provider_record("inst-1".into(), "provision")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec["identity"]["bootstrap_token"], "(not kept)");
        assert_eq!(rec["identity"]["node_id"], "n");
        let mem = store.load().unwrap();
        assert_eq!(mem.certs["01"].key_sha256, None);
        assert_eq!(mem.tokens["h"].serial, None);
        assert_eq!(store.cert_pem("01".into()).await.unwrap(), None);
        let version: i64 = store
            .with_conn(|c| Ok(c.query_row("PRAGMA user_version", [], |r| r.get(0))?))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);

        let mut cert = mem.certs["01"].clone();
        cert.key_sha256 = Some("ab".into());
        store
            .apply(vec![
                Op::Cert(cert.clone()),
                Op::CertPem {
                    serial: "01".into(),
                    pem: "PEM".into(),
                },
            ])
            .await
            .unwrap();
        cert.revoked = true;
        store.apply(vec![Op::Cert(cert)]).await.unwrap();
        assert_eq!(
            store.cert_pem("01".into()).await.unwrap().as_deref(),
            Some("PEM")
        );
        drop(store);
        // Opening again runs nothing twice.
        let store = Store::open(dir.path()).unwrap();
        assert!(store.load().unwrap().certs["01"].revoked);
        store
            .with_conn(|c| Ok(c.pragma_update(None, "user_version", 99)?))
            .unwrap();
        drop(store);
        let err = Store::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::NewerSchema { found: 99, .. }),
            "{err}"
        );
    }

    #[test]
    fn commits_are_fsynced_before_they_are_answered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let conn = store.conn.lock().unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            (mode.as_str(), sync),
            ("wal", 2),
            "WAL with synchronous=FULL (2)"
        );
    }
}
