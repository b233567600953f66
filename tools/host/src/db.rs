//! The results database: one SQLite file, one row per benchmark run.
//!
//! Each row has the figures people filter and sort on as plain columns (board, model, variant,
//! latency percentiles, memory peaks, ...) so `sqlite3 results.sqlite 'select ...'` works
//! without edgevlm, and the whole [`BenchRecord`] as JSON in the `trace` column so nothing the
//! run measured is lost. Reading always goes through the JSON: it is the record of truth.
//!
//! The schema version is kept in `PRAGMA user_version`; a file written by a newer edgevlm is
//! refused rather than misread. The journal is in WAL mode so a `compare` can read while a
//! `bench` writes.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};

use crate::record::BenchRecord;

/// The schema this build writes and reads. 2: the `load_source` column (a version 1 file
/// gains it, empty for its runs, when this build opens it).
pub const SCHEMA_VERSION: i64 = 2;

/// File name of the database inside `$EDGEVLM_HOME` or the data directory.
pub const DB_FILE_NAME: &str = "results.sqlite";

/// Where the results database lives when no `--db` is given: `$EDGEVLM_DB`, else
/// `$EDGEVLM_HOME/results.sqlite`, else `$XDG_DATA_HOME/edgevlm/results.sqlite`, else
/// `~/.local/share/edgevlm/results.sqlite` (`./results.sqlite` without a home directory).
pub fn default_db_path() -> PathBuf {
    db_path_from(|name| std::env::var_os(name))
}

fn db_path_from(env: impl Fn(&str) -> Option<OsString>) -> PathBuf {
    let var = |name| env(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(db) = var("EDGEVLM_DB") {
        return db;
    }
    if let Some(home) = var("EDGEVLM_HOME") {
        return home.join(DB_FILE_NAME);
    }
    if let Some(data) = var("XDG_DATA_HOME").filter(|p| p.is_absolute()) {
        return data.join("edgevlm").join(DB_FILE_NAME);
    }
    match var("HOME") {
        Some(home) => home.join(".local/share/edgevlm").join(DB_FILE_NAME),
        None => PathBuf::from(DB_FILE_NAME),
    }
}

/// Why the results database could not be used. Every variant names the database file.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The folder for a new database could not be created.
    #[error("creating folder {dir} for the results database: {source}")]
    CreateDir {
        /// The folder.
        dir: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// `open_existing` on a path that holds no file.
    #[error("no results database at {path} (run `edgevlm bench` first, or pass --db FILE)")]
    Missing {
        /// The database file.
        path: PathBuf,
    },
    /// The file was written by a newer edgevlm.
    #[error(
        "results database {path} has schema version {found}, this edgevlm reads up to version \
         {supported}: upgrade edgevlm or use another database file"
    )]
    NewerSchema {
        /// The database file.
        path: PathBuf,
        /// `PRAGMA user_version` of the file.
        found: i64,
        /// [`SCHEMA_VERSION`].
        supported: i64,
    },
    /// The file is an SQLite database, but not one of ours.
    #[error("{path} is an SQLite database without an edgevlm results schema (it has tables but user_version 0): use another file")]
    Foreign {
        /// The database file.
        path: PathBuf,
    },
    /// SQLite failed.
    #[error("results database {path}: {action}: {source}")]
    Sql {
        /// The database file.
        path: PathBuf,
        /// What was being done (`opening`, `inserting a run`, ...).
        action: String,
        /// Cause.
        source: rusqlite::Error,
    },
    /// A run id that is not in the database.
    #[error("results database {path} has no run {id} ({stored})")]
    UnknownRun {
        /// The database file.
        path: PathBuf,
        /// The id asked for.
        id: i64,
        /// What it does hold (`its runs are 1 to 17`).
        stored: String,
    },
    /// A figure does not fit SQLite's signed 64-bit integers.
    #[error("results database {path}: {field} = {value} is too large to store")]
    TooLarge {
        /// The database file.
        path: PathBuf,
        /// The record field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A stored record's JSON could not be written or read back.
    #[error("results database {path}: run {id}: record JSON: {source}")]
    Json {
        /// The database file.
        path: PathBuf,
        /// The run id (0 before insertion).
        id: i64,
        /// Cause.
        source: serde_json::Error,
    },
}

/// Narrows which runs [`ResultsDb::filter`] returns. Empty fields match everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Exact model name.
    pub model: Option<String>,
    /// Exact model variant (`int8`).
    pub variant: Option<String>,
    /// Exact board inventory name.
    pub board: Option<String>,
    /// Runs started at or after this time (seconds since the Unix epoch).
    pub since: Option<i64>,
    /// Only the most recent N matching runs.
    pub last: Option<usize>,
}

/// An open results database.
#[derive(Debug)]
pub struct ResultsDb {
    conn: Connection,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE runs (
    id                INTEGER PRIMARY KEY AUTOINCREMENT,
    started_at        INTEGER NOT NULL,
    host_version      TEXT    NOT NULL,
    board_name        TEXT    NOT NULL,
    board_url         TEXT    NOT NULL,
    board_profile     TEXT    NOT NULL,
    board_arch        TEXT    NOT NULL,
    board_cpu         TEXT    NOT NULL,
    board_cores       INTEGER NOT NULL,
    board_ram_kib     INTEGER NOT NULL,
    agent_version     TEXT    NOT NULL,
    tract_version     TEXT    NOT NULL,
    model_name        TEXT    NOT NULL,
    model_version     TEXT    NOT NULL,
    model_variant     TEXT    NOT NULL,
    model_task        TEXT    NOT NULL,
    model_bytes       INTEGER NOT NULL,
    warmup            INTEGER NOT NULL,
    iterations_asked  INTEGER NOT NULL,
    min_duration_ms   INTEGER NOT NULL,
    threads           INTEGER NOT NULL,
    input             TEXT    NOT NULL,
    traced            INTEGER NOT NULL,
    agent_run         INTEGER NOT NULL,
    load_us           INTEGER NOT NULL,
    first_run_us      INTEGER NOT NULL,
    load_source       TEXT    NOT NULL DEFAULT '',
    iterations        INTEGER NOT NULL,
    latency_min_us    INTEGER NOT NULL,
    latency_mean_us   INTEGER NOT NULL,
    latency_p50_us    INTEGER NOT NULL,
    latency_p90_us    INTEGER NOT NULL,
    latency_p99_us    INTEGER NOT NULL,
    latency_max_us    INTEGER NOT NULL,
    prompt_tokens     INTEGER,
    generated_tokens  INTEGER,
    ttft_p50_us       INTEGER,
    prefill_tok_s     REAL,
    decode_tok_s      REAL,
    peak_rss_kib      INTEGER NOT NULL,
    peak_pss_kib      INTEGER NOT NULL,
    dropped_events    INTEGER NOT NULL,
    trace             TEXT    NOT NULL
);
CREATE INDEX runs_started_at ON runs (started_at);
CREATE INDEX runs_model ON runs (model_name, model_variant, model_version);
CREATE INDEX runs_board ON runs (board_name);
";

impl ResultsDb {
    /// Opens the database at `path`, creating the file, its parent folders and the schema when
    /// they do not exist yet.
    pub fn open(path: &Path) -> Result<ResultsDb, DbError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| DbError::CreateDir {
                dir: dir.to_owned(),
                source,
            })?;
        }
        Self::open_with(path, OpenFlags::default())
    }

    /// Opens an existing database (for reading and writing); a missing file is an error
    /// ([`DbError::Missing`]) instead of a new empty database.
    pub fn open_existing(path: &Path) -> Result<ResultsDb, DbError> {
        if !path.is_file() {
            return Err(DbError::Missing {
                path: path.to_owned(),
            });
        }
        Self::open_with(
            path,
            OpenFlags::default().difference(OpenFlags::SQLITE_OPEN_CREATE),
        )
    }

    fn open_with(path: &Path, flags: OpenFlags) -> Result<ResultsDb, DbError> {
        let sql = |action: &str| {
            let action = action.to_owned();
            move |source| DbError::Sql {
                path: path.to_owned(),
                action,
                source,
            }
        };
        let conn = Connection::open_with_flags(path, flags).map_err(sql("opening"))?;
        // Another process may be inserting a run right now: wait for its lock.
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(sql("setting the busy timeout"))?;
        let mut db = ResultsDb {
            conn,
            path: path.to_owned(),
        };
        db.migrate()?;
        // WAL lets `compare` read while `bench` writes. Filesystems without shared memory
        // (some network mounts) keep the rollback journal, which is slower but still correct.
        db.conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))
            .map_err(sql("switching to WAL"))?;
        db.conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(sql("setting synchronous"))?;
        Ok(db)
    }

    fn sql_err(&self, action: impl Into<String>) -> impl FnOnce(rusqlite::Error) -> DbError + '_ {
        let action = action.into();
        move |source| DbError::Sql {
            path: self.path.clone(),
            action,
            source,
        }
    }

    fn migrate(&mut self) -> Result<(), DbError> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(self.sql_err("reading the schema version"))?;
        if version > SCHEMA_VERSION {
            return Err(DbError::NewerSchema {
                path: self.path.clone(),
                found: version,
                supported: SCHEMA_VERSION,
            });
        }
        if version == SCHEMA_VERSION {
            return Ok(());
        }
        // Version 1 or 0 (a new file, or somebody else's database).
        let path = self.path.clone();
        let sql = move |action: &str| {
            let path = path.clone();
            let action = action.to_owned();
            move |source| DbError::Sql {
                path,
                action,
                source,
            }
        };
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(sql("creating the schema"))?;
        // Re-read under the write lock: a concurrent `open` may have created it meanwhile.
        let version: i64 = tx
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(sql("reading the schema version"))?;
        if version == SCHEMA_VERSION {
            return Ok(());
        }
        if version == 1 {
            tx.execute_batch("ALTER TABLE runs ADD COLUMN load_source TEXT NOT NULL DEFAULT ''")
                .map_err(sql("adding the load_source column"))?;
            tx.pragma_update(None, "user_version", SCHEMA_VERSION)
                .map_err(sql("setting the schema version"))?;
            return tx.commit().map_err(sql("upgrading the schema"));
        }
        let tables: i64 = tx
            .query_row("SELECT count(*) FROM sqlite_schema", [], |r| r.get(0))
            .map_err(sql("reading the schema"))?;
        if tables > 0 {
            return Err(DbError::Foreign {
                path: self.path.clone(),
            });
        }
        tx.execute_batch(SCHEMA)
            .map_err(sql("creating the schema"))?;
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(sql("setting the schema version"))?;
        tx.commit().map_err(sql("creating the schema"))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stores a run. Sets `record.id` to the new row id and, when it is 0, `record.started_at`
    /// to now; returns the id.
    pub fn insert(&mut self, record: &mut BenchRecord) -> Result<i64, DbError> {
        if record.started_at == 0 {
            record.started_at = now();
        }
        let path = self.path.clone();
        let int = |field: &'static str, value: u64| {
            i64::try_from(value).map_err(|_| DbError::TooLarge {
                path: path.clone(),
                field,
                value,
            })
        };
        let r = &*record;
        let tokens = r.tokens.as_ref();
        let columns = [
            int("model.bytes", r.model.bytes)?,
            int("board.ram_total_kib", r.board.ram_total_kib)?,
            int("load_us", r.load_us)?,
            int("first_run_us", r.first_run_us)?,
            int("latency.min_us", r.latency.min_us)?,
            int("latency.mean_us", r.latency.mean_us)?,
            int("latency.p50_us", r.latency.p50_us)?,
            int("latency.p90_us", r.latency.p90_us)?,
            int("latency.p99_us", r.latency.p99_us)?,
            int("latency.max_us", r.latency.max_us)?,
            int("peak_rss_kib", r.peak_rss_kib)?,
            int("peak_pss_kib", r.peak_pss_kib)?,
        ];
        let generated = tokens
            .map(|t| int("tokens.generated_tokens", t.generated_tokens))
            .transpose()?;
        let ttft = tokens
            .map(|t| int("tokens.ttft_p50_us", t.ttft_p50_us))
            .transpose()?;
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(|source| DbError::Sql {
                path: path.clone(),
                action: "inserting a run".into(),
                source,
            })?;
        let sql = |action: &'static str| {
            let path = path.clone();
            move |source| DbError::Sql {
                path,
                action: action.into(),
                source,
            }
        };
        tx.execute(
            "INSERT INTO runs (
                started_at, host_version,
                board_name, board_url, board_profile, board_arch, board_cpu, board_cores,
                board_ram_kib, agent_version, tract_version,
                model_name, model_version, model_variant, model_task, model_bytes,
                warmup, iterations_asked, min_duration_ms, threads, input, traced,
                agent_run, load_us, first_run_us, load_source, iterations,
                latency_min_us, latency_mean_us, latency_p50_us, latency_p90_us,
                latency_p99_us, latency_max_us,
                prompt_tokens, generated_tokens, ttft_p50_us, prefill_tok_s, decode_tok_s,
                peak_rss_kib, peak_pss_kib, dropped_events, trace
            ) VALUES (
                ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32,
                ?33, ?34, ?35, ?36, ?37, ?38, ?39, ?40, ?41, '{}'
            )",
            params![
                r.started_at,
                r.host_version,
                r.board.name,
                r.board.url,
                r.board.profile,
                r.board.arch,
                r.board.cpu_model,
                r.board.cores,
                columns[1],
                r.board.agent_version,
                r.board.tract_version,
                r.model.name,
                r.model.version,
                r.model.variant,
                r.model.task,
                columns[0],
                r.settings.warmup,
                r.settings.iterations,
                r.settings.min_duration_ms,
                r.settings.threads,
                r.settings.input,
                r.settings.traced,
                r.run,
                columns[2],
                columns[3],
                r.load_source,
                r.iterations,
                columns[4],
                columns[5],
                columns[6],
                columns[7],
                columns[8],
                columns[9],
                tokens.map(|t| t.prompt_tokens),
                generated,
                ttft,
                tokens.map(|t| t.prefill_tok_s),
                tokens.map(|t| t.decode_tok_s),
                columns[10],
                columns[11],
                r.dropped_events,
            ],
        )
        .map_err(sql("inserting a run"))?;
        let id = tx.last_insert_rowid();
        // The JSON carries the id too, so a row read with sqlite3 alone is self-describing.
        let mut stored = record.clone();
        stored.id = id;
        let json = serde_json::to_string(&stored).map_err(|source| DbError::Json {
            path: path.clone(),
            id,
            source,
        })?;
        tx.execute(
            "UPDATE runs SET trace = ?1 WHERE id = ?2",
            params![json, id],
        )
        .map_err(sql("storing the run's record"))?;
        tx.commit().map_err(sql("committing a run"))?;
        record.id = id;
        Ok(id)
    }

    /// The run with this id, if any.
    pub fn get(&self, id: i64) -> Result<Option<BenchRecord>, DbError> {
        self.conn
            .query_row(
                "SELECT id, started_at, trace FROM runs WHERE id = ?1",
                [id],
                raw_row,
            )
            .optional()
            .map_err(self.sql_err(format!("reading run {id}")))?
            .map(|raw| self.decode(raw))
            .transpose()
    }

    /// The runs with these ids, in the order asked; an id that is not stored is
    /// [`DbError::UnknownRun`].
    pub fn get_many(&self, ids: &[i64]) -> Result<Vec<BenchRecord>, DbError> {
        ids.iter()
            .map(|&id| {
                self.get(id)?.ok_or_else(|| DbError::UnknownRun {
                    path: self.path.clone(),
                    id,
                    stored: match self.id_range() {
                        Ok(Some((lo, hi))) => format!("its runs are {lo} to {hi}"),
                        Ok(None) => "it holds no runs".into(),
                        Err(e) => format!("listing its runs failed too: {e}"),
                    },
                })
            })
            .collect()
    }

    /// The `n` most recent runs, oldest first (so the first is the natural baseline).
    pub fn last(&self, n: usize) -> Result<Vec<BenchRecord>, DbError> {
        self.filter(&Filter {
            last: Some(n),
            ..Filter::default()
        })
    }

    /// Every run, oldest first.
    pub fn all(&self) -> Result<Vec<BenchRecord>, DbError> {
        self.filter(&Filter::default())
    }

    /// The runs matching `filter`, oldest first.
    pub fn filter(&self, filter: &Filter) -> Result<Vec<BenchRecord>, DbError> {
        let mut conditions = Vec::new();
        let mut values: Vec<rusqlite::types::Value> = Vec::new();
        for (column, value) in [
            ("model_name", &filter.model),
            ("model_variant", &filter.variant),
            ("board_name", &filter.board),
        ] {
            if let Some(v) = value {
                values.push(v.clone().into());
                conditions.push(format!("{column} = ?{}", values.len()));
            }
        }
        if let Some(since) = filter.since {
            values.push(since.into());
            conditions.push(format!("started_at >= ?{}", values.len()));
        }
        let mut sql = String::from("SELECT id, started_at, trace FROM runs");
        if !conditions.is_empty() {
            sql += " WHERE ";
            sql += &conditions.join(" AND ");
        }
        sql += " ORDER BY id DESC";
        if let Some(n) = filter.last {
            values.push(i64::try_from(n).unwrap_or(i64::MAX).into());
            sql += &format!(" LIMIT ?{}", values.len());
        }
        let mut stmt = self
            .conn
            .prepare(&sql)
            .map_err(self.sql_err("listing runs"))?;
        let raws = stmt
            .query_map(rusqlite::params_from_iter(values), raw_row)
            .and_then(|rows| rows.collect::<Result<Vec<_>, _>>())
            .map_err(self.sql_err("listing runs"))?;
        let mut records = raws
            .into_iter()
            .map(|raw| self.decode(raw))
            .collect::<Result<Vec<_>, _>>()?;
        records.reverse();
        Ok(records)
    }

    /// Number of stored runs.
    pub fn count(&self) -> Result<u64, DbError> {
        self.conn
            .query_row("SELECT count(*) FROM runs", [], |r| r.get::<_, i64>(0))
            .map(|n| n.max(0) as u64)
            .map_err(self.sql_err("counting runs"))
    }

    /// The smallest and largest run id, `None` when there are no runs (for error messages).
    pub fn id_range(&self) -> Result<Option<(i64, i64)>, DbError> {
        self.conn
            .query_row("SELECT min(id), max(id) FROM runs", [], |r| {
                Ok(r.get::<_, Option<i64>>(0)?.zip(r.get::<_, Option<i64>>(1)?))
            })
            .map_err(self.sql_err("listing run ids"))
    }

    fn decode(&self, (id, started_at, json): (i64, i64, String)) -> Result<BenchRecord, DbError> {
        let mut record: BenchRecord =
            serde_json::from_str(&json).map_err(|source| DbError::Json {
                path: self.path.clone(),
                id,
                source,
            })?;
        // The columns win: they are what queries and `UPDATE`s see.
        record.id = id;
        record.started_at = started_at;
        Ok(record)
    }
}

fn raw_row(row: &Row<'_>) -> rusqlite::Result<(i64, i64, String)> {
    Ok((row.get(0)?, row.get(1)?, row.get(2)?))
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn default_path_prefers_db_then_home_then_data_dir() {
        let all = [
            ("EDGEVLM_DB", "/x/r.db"),
            ("EDGEVLM_HOME", "/eh"),
            ("XDG_DATA_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(db_path_from(env(&all)), PathBuf::from("/x/r.db"));
        assert_eq!(
            db_path_from(env(&all[1..])),
            PathBuf::from("/eh/results.sqlite")
        );
        assert_eq!(
            db_path_from(env(&all[2..])),
            PathBuf::from("/xdg/edgevlm/results.sqlite")
        );
        assert_eq!(
            db_path_from(env(&all[3..])),
            PathBuf::from("/home/u/.local/share/edgevlm/results.sqlite")
        );
        // Empty values count as unset; a relative XDG_DATA_HOME is ignored (XDG spec).
        assert_eq!(
            db_path_from(env(&[
                ("EDGEVLM_DB", ""),
                ("XDG_DATA_HOME", "rel"),
                ("HOME", "/h")
            ])),
            PathBuf::from("/h/.local/share/edgevlm/results.sqlite")
        );
        assert_eq!(db_path_from(env(&[])), PathBuf::from("results.sqlite"));
    }

    #[test]
    fn too_large_values_are_refused_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite");
        let mut db = ResultsDb::open(&path).unwrap();
        let mut r = BenchRecord {
            load_us: u64::MAX,
            ..Default::default()
        };
        let err = db.insert(&mut r).unwrap_err().to_string();
        assert!(err.contains("load_us") && err.contains("r.sqlite"), "{err}");
        assert_eq!(db.count().unwrap(), 0);
    }

    #[test]
    fn wal_and_schema_version_are_set() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/deeper/r.sqlite");
        let db = ResultsDb::open(&path).unwrap();
        let mode: String = db
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let v: i64 = db
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
    }

    /// A file of schema version 1 (without `load_source`) is upgraded in place when opened:
    /// its runs stay readable, new runs store where their load came from.
    #[test]
    fn a_version_1_file_gains_the_load_source_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.sqlite");
        let mut old = BenchRecord {
            load_us: 7,
            ..BenchRecord::default()
        };
        {
            let mut db = ResultsDb::open(&path).unwrap();
            db.insert(&mut old).unwrap();
            // Back to version 1: the column gone, the record's JSON without the field.
            let json: String = db
                .conn
                .query_row("SELECT trace FROM runs", [], |r| r.get(0))
                .unwrap();
            let json = json.replace(",\"load_source\":\"\"", "");
            assert!(!json.contains("load_source"), "{json}");
            db.conn
                .execute("UPDATE runs SET trace = ?1", [json])
                .unwrap();
            db.conn
                .execute_batch("ALTER TABLE runs DROP COLUMN load_source; PRAGMA user_version = 1")
                .unwrap();
        }
        let mut db = ResultsDb::open(&path).unwrap();
        let v: i64 = db
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        assert_eq!(db.get(old.id).unwrap().unwrap(), old);
        let mut new = BenchRecord {
            load_source: "cache".into(),
            ..BenchRecord::default()
        };
        db.insert(&mut new).unwrap();
        let sources: Vec<String> = db
            .conn
            .prepare("SELECT load_source FROM runs ORDER BY id")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(sources, ["", "cache"]);
        assert_eq!(db.get(new.id).unwrap().unwrap().load_source, "cache");
    }
}
