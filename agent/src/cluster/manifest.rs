//! [`ManifestSource`]: the cluster state from a watched directory of Kubernetes manifests
//! (`*.yaml`, `*.yml`, `*.json`; multi-document YAML; `kind: List` and typed lists such as
//! `NodeList`). It serves a node without a cluster, the demo and the tests.
//!
//! Semantics:
//! * Only the directory's own entries are read (not subdirectories); names starting with `.` are
//!   skipped, so editor temp files and a ConfigMap volume's `..data` machinery are ignored while
//!   its visible symlinks are followed.
//! * A file that does not parse is logged (warn, file name and error) and skipped; if an earlier
//!   version of it parsed, that version stays in force until the file is fixed or removed, so a
//!   file caught half-written never withdraws its objects. Removing a file removes its objects.
//! * Changes are seen through inotify (coalesced for [`FS_COALESCE`]), also when files are
//!   replaced by rename or the directory itself (or a symlink to it) is swapped; a slow rescan
//!   ([`RESCAN`]) is the safety net. A publication happens only when the model changed.
use super::model::{ClusterModel, Kind, Object};
use super::{Publisher, StateSource};
use crate::error::{Error, Result};
use futures::future::BoxFuture;
use notify::event::{AccessKind, AccessMode};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// How long file-system events are gathered before the directory is re-read.
pub const FS_COALESCE: Duration = Duration::from_millis(50);
/// Re-read the directory this often even without events (cheap: unchanged files are not
/// re-parsed).
pub const RESCAN: Duration = Duration::from_secs(30);

/// Identity and version of a file: a rewrite or a rename over it changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileSig {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl FileSig {
    fn of(m: &std::fs::Metadata) -> FileSig {
        FileSig {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
        }
    }
}

/// What was last read of one file.
struct FileEntry {
    sig: FileSig,
    /// The objects of the last version that parsed (None: no version parsed yet).
    objects: Option<Vec<Object>>,
}

/// Reads a manifest directory into a model, re-parsing only the files that changed.
struct DirReader {
    dir: PathBuf,
    node: String,
    files: BTreeMap<PathBuf, FileEntry>,
    model: ClusterModel,
}

impl DirReader {
    fn new(dir: PathBuf, node: String) -> DirReader {
        DirReader {
            dir,
            node,
            files: BTreeMap::new(),
            model: ClusterModel::default(),
        }
    }

    /// Re-reads the directory; returns the (possibly unchanged) model.
    fn read(&mut self) -> Result<&ClusterModel> {
        let ctx = || format!("manifest directory {}", self.dir.display());
        let mut present = BTreeSet::new();
        let mut changed = false;
        for entry in std::fs::read_dir(&self.dir).map_err(|e| Error::io(ctx(), e))? {
            let entry = entry.map_err(|e| Error::io(ctx(), e))?;
            let path = entry.path();
            if !is_manifest_name(&path) {
                continue;
            }
            // Follow symlinks (ConfigMap volumes link every key into `..data/`).
            let meta = match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => m,
                Ok(_) => continue,
                Err(e) => {
                    // Vanished between readdir and stat, or a dangling link.
                    debug!(file = %path.display(), error = %e, "skipping manifest");
                    continue;
                }
            };
            let sig = FileSig::of(&meta);
            present.insert(path.clone());
            if self.files.get(&path).is_some_and(|f| f.sig == sig) {
                continue;
            }
            changed = true;
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|bytes| parse_manifest(&path, &bytes));
            let previous = self.files.remove(&path).and_then(|f| f.objects);
            let objects = match parsed {
                // Kept slim: a directory of 10 000 pods costs their policy view, not the pods.
                Ok(objs) => Some(objs.into_iter().map(|o| o.slim(&self.node)).collect()),
                Err(e) => {
                    if previous.is_some() {
                        warn!(file = %path.display(), error = %e,
                            "manifest does not parse; keeping its previous version");
                    } else {
                        warn!(file = %path.display(), error = %e, "manifest does not parse; skipped");
                    }
                    previous
                }
            };
            self.files.insert(path, FileEntry { sig, objects });
        }
        let before = self.files.len();
        self.files.retain(|p, _| present.contains(p));
        changed |= self.files.len() != before;
        if changed {
            self.model = self.build();
        }
        self.model.synced = true;
        Ok(&self.model)
    }

    fn build(&self) -> ClusterModel {
        let mut model = ClusterModel::default();
        let mut seen: BTreeMap<(Kind, String), &Path> = BTreeMap::new();
        for (path, entry) in &self.files {
            for obj in entry.objects.iter().flatten() {
                let id = (obj.kind(), obj.display_name());
                if let Some(first) = seen.insert(id, path) {
                    warn!(file = %path.display(), other = %first.display(),
                        "{} {} defined twice; the later file wins", obj.kind().kind(), obj.display_name());
                }
                model.upsert(obj.clone(), &self.node);
            }
        }
        model
    }
}

fn is_manifest_name(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.')
        && [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.len() > ext.len() && name.ends_with(ext))
}

/// Parses one manifest file (format by extension: `.json`, else YAML) into the objects of watched
/// kinds it holds; other kinds are skipped (debug log). Any error fails the whole file.
pub fn parse_manifest(path: &Path, bytes: &[u8]) -> std::result::Result<Vec<Object>, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let docs: Vec<Value> = if path.extension().is_some_and(|e| e == "json") {
        vec![serde_json::from_str(text).map_err(|e| e.to_string())?]
    } else {
        let options = serde_saphyr::options! {
            budget: serde_saphyr::budget! {
                max_documents: 1_000_000,
                max_nodes: 50_000_000,
                max_events: 200_000_000,
            },
        };
        serde_saphyr::from_multiple_with_options(text, options).map_err(|e| e.to_string())?
    };
    let mut out = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        collect(path, doc, None, &mut out).map_err(|e| format!("document {}: {e}", i + 1))?;
    }
    Ok(out)
}

/// Adds the objects of one document (an object or a list) to `out`. `item_type`: the
/// (apiVersion, kind) of a typed list's items, which may omit them.
fn collect(
    path: &Path,
    doc: Value,
    item_type: Option<(&str, &str)>,
    out: &mut Vec<Object>,
) -> std::result::Result<(), String> {
    let mut doc = match doc {
        Value::Null => return Ok(()),
        Value::Object(m) => m,
        other => return Err(format!("expected an object, found {}", type_name(&other))),
    };
    if let Some((api_version, kind)) = item_type {
        doc.entry("apiVersion")
            .or_insert_with(|| Value::String(api_version.into()));
        doc.entry("kind")
            .or_insert_with(|| Value::String(kind.into()));
    }
    let api_version = str_field(&doc, "apiVersion")?.to_string();
    let kind = str_field(&doc, "kind")?.to_string();
    if let Some(elem) = kind.strip_suffix("List")
        && doc.contains_key("items")
    {
        let items = match doc.remove("items") {
            Some(Value::Array(items)) => items,
            Some(Value::Null) => Vec::new(),
            Some(other) => return Err(format!("{kind}.items is {}", type_name(&other))),
            None => unreachable!(),
        };
        // `kind: List` items carry their own type; `NodeList` items may omit it.
        let item_type = (!elem.is_empty()).then_some((api_version.as_str(), elem));
        for (i, item) in items.into_iter().enumerate() {
            collect(path, item, item_type, out).map_err(|e| format!("items[{i}]: {e}"))?;
        }
        return Ok(());
    }
    let Some(k) = Kind::from_type(&api_version, &kind) else {
        debug!(file = %path.display(), api_version, kind, "ignoring manifest of an unwatched kind");
        return Ok(());
    };
    let mut obj = Object::from_value(k, Value::Object(doc)).map_err(|e| format!("{kind}: {e}"))?;
    let meta = obj.metadata_mut();
    if k.namespaced() {
        // As kubectl applies it: a namespaced object without a namespace is in "default".
        meta.namespace.get_or_insert_with(|| "default".into());
    }
    if meta.name.as_deref().is_none_or(str::is_empty) {
        return Err(format!("{kind} without metadata.name"));
    }
    out.push(obj);
    Ok(())
}

fn str_field<'a>(
    doc: &'a serde_json::Map<String, Value>,
    key: &str,
) -> std::result::Result<&'a str, String> {
    match doc.get(key) {
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(_) => Err(format!("{key} is not a non-empty string")),
        None => Err(format!("no {key}")),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The manifest-directory source.
pub struct ManifestSource {
    reader: DirReader,
    watcher: RecommendedWatcher,
    events: mpsc::UnboundedReceiver<()>,
    /// (dev, ino) of the directory when it was put under watch.
    watched: (u64, u64),
}

impl ManifestSource {
    /// Puts `dir` under watch and reads it. A missing or unreadable directory is an error.
    /// Returns the source and the initial (synced) model.
    pub fn open(dir: &Path, node_name: &str) -> Result<(ManifestSource, ClusterModel)> {
        let dir = std::path::absolute(dir)
            .map_err(|e| Error::io(format!("manifest directory {}", dir.display()), e))?;
        let (tx, events) = mpsc::unbounded_channel();
        let filter_dir = dir.clone();
        let watcher =
            notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
                Ok(ev) if is_relevant(&filter_dir, &ev) => {
                    let _ = tx.send(());
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "manifest directory watch");
                    let _ = tx.send(());
                }
            })
            .map_err(|e| notify_error(&dir, e))?;
        let mut source = ManifestSource {
            reader: DirReader::new(dir.clone(), node_name.to_string()),
            watcher,
            events,
            watched: (0, 0),
        };
        source.watch_dir()?;
        // Watch the parent too, so swapping the directory (or a symlink to it) is seen at once.
        if let Some(parent) = dir.parent()
            && let Err(e) = source.watcher.watch(parent, RecursiveMode::NonRecursive)
        {
            debug!(dir = %parent.display(), error = %e, "not watching the parent directory");
        }
        let mut model = source.reader.read()?.clone();
        model.revision = 1;
        info!(dir = %dir.display(), nodes = model.nodes.len(), local_pods = model.local_pods.len(),
            pods = model.pods.len(), namespaces = model.namespaces.len(),
            network_policies = model.network_policies.len(), "manifests read");
        Ok((source, model))
    }

    fn watch_dir(&mut self) -> Result<()> {
        let dir = &self.reader.dir;
        let meta = std::fs::metadata(dir)
            .map_err(|e| Error::io(format!("manifest directory {}", dir.display()), e))?;
        if !meta.is_dir() {
            return Err(Error::Config(format!(
                "manifests: {} is not a directory",
                dir.display()
            )));
        }
        let _ = self.watcher.unwatch(dir);
        self.watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|e| notify_error(dir, e))?;
        self.watched = (meta.dev(), meta.ino());
        Ok(())
    }

    /// Re-watches the directory if the path now names another one (swapped by rename).
    fn rewatch_if_replaced(&mut self) {
        let Ok(meta) = std::fs::metadata(&self.reader.dir) else {
            return;
        };
        if (meta.dev(), meta.ino()) != self.watched {
            info!(dir = %self.reader.dir.display(), "manifest directory replaced; watching the new one");
            if let Err(e) = self.watch_dir() {
                warn!(error = %e, "re-watching the manifest directory");
            }
        }
    }

    async fn run_loop(mut self, out: Publisher) {
        let mut rescan = tokio::time::interval(RESCAN);
        rescan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescan.tick().await;
        let mut failing = false;
        loop {
            tokio::select! {
                _ = out.closed() => return,
                ev = self.events.recv() => if ev.is_none() { return },
                _ = rescan.tick() => {}
            }
            tokio::time::sleep(FS_COALESCE).await;
            while self.events.try_recv().is_ok() {}
            self.rewatch_if_replaced();
            let dir = self.reader.dir.display().to_string();
            match self.reader.read() {
                Ok(model) => {
                    if failing {
                        info!(dir, "manifest directory readable again");
                        failing = false;
                    }
                    if out.publish(model) {
                        info!(
                            nodes = model.nodes.len(),
                            local_pods = model.local_pods.len(),
                            pods = model.pods.len(),
                            namespaces = model.namespaces.len(),
                            network_policies = model.network_policies.len(),
                            revision = out.current().revision,
                            "manifests changed"
                        );
                    }
                }
                Err(e) => {
                    if !failing {
                        warn!(dir, error = %e, "reading manifests; keeping the last model");
                        failing = true;
                    }
                }
            }
        }
    }
}

/// Whether a file-system event may change what the directory holds (our own reads open files,
/// which inotify reports too).
fn is_relevant(dir: &Path, ev: &notify::Event) -> bool {
    if let EventKind::Access(a) = ev.kind
        && a != AccessKind::Close(AccessMode::Write)
    {
        return false;
    }
    ev.paths.is_empty() || ev.paths.iter().any(|p| p == dir || p.parent() == Some(dir))
}

fn notify_error(dir: &Path, e: notify::Error) -> Error {
    let ctx = format!("watching manifest directory {}", dir.display());
    match e.kind {
        notify::ErrorKind::Io(io) => Error::io(ctx, io),
        notify::ErrorKind::PathNotFound => Error::io(ctx, std::io::ErrorKind::NotFound.into()),
        _ => Error::Config(format!("{ctx}: {e}")),
    }
}

impl StateSource for ManifestSource {
    fn name(&self) -> &'static str {
        "manifests"
    }

    fn run(self: Box<Self>, out: Publisher) -> BoxFuture<'static, ()> {
        Box::pin(self.run_loop(out))
    }
}
