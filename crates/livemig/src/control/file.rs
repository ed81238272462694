//! Snapshot files and local mode on the control socket.
//!
//! - `migrate file:PATH` with capability `mapped-ram` (QEMU's name) writes
//!   a mapped-ram file ([`crate::snapshot`]) of the paused guest; with
//!   capability `background-snapshot` (QEMU's name) the guest is paused only
//!   to arm write protection and save its state, then runs on while its
//!   memory is written (the file is in the mapped-ram layout either way).
//!   Threads: `multifd-channels` with the `multifd` capability, else
//!   [`crate::snapshot::default_threads`]; parameter `direct-io` (QEMU's
//!   name) writes pages with `O_DIRECT`.
//! - `migrate-incoming file:PATH` of a mapped-ram file (recognised by its
//!   magic; with `mapped-ram` set here it must be one) restores it; with
//!   livemig's parameter `x-livemig-lazy` the guest resumes as soon as its
//!   state is in and memory is served from the file on first touch.
//! - Parameter `mode: "local"` refuses, naming them, the settings that
//!   shape how pages travel ([`crate::engine::local::check_params`]) and
//!   TLS, on both sides, as well as the snapshot capabilities.
//!
//! These checks run when `migrate` / `migrate-incoming` is sent, so a
//! refusal is the command's error answer and nothing has started.

use std::path::{Path, PathBuf};

use super::commands::{generic, CmdError};
use crate::engine::local::{check_params, LocalUnsupported};
use crate::engine::{MigrationMode, Params};
use crate::transport::Uri;

/// How a `migrate` / `migrate-incoming` to or from a `file:` URI uses a
/// snapshot file: what the VMM's [`super::MigrationStarter::start_snapshot`]
/// and [`super::MigrationStarter::start_restore`] are asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileOptions {
    /// Capability `mapped-ram`: the mapped-ram layout (always true for a
    /// background snapshot, whose files use that layout).
    pub mapped_ram: bool,
    /// Capability `background-snapshot`: snapshot the running guest; it
    /// runs on afterwards.
    pub background_snapshot: bool,
    /// Parameter `x-livemig-lazy` (restore): resume before memory is in.
    pub lazy: bool,
    /// Threads writing or reading the file.
    pub threads: usize,
    /// Parameter `direct-io`: write pages with `O_DIRECT`.
    pub direct_io: bool,
}

/// The control socket's snapshot and local-mode settings (capabilities
/// `mapped-ram`, `background-snapshot`; parameters `direct-io`,
/// `x-livemig-lazy`).
#[derive(Clone, Debug, Default)]
pub(crate) struct FileSide {
    pub(crate) mapped_ram: bool,
    pub(crate) background_snapshot: bool,
    pub(crate) direct_io: bool,
    pub(crate) lazy: bool,
}

/// What a `migrate` / `migrate-incoming` turns into.
#[derive(Debug)]
pub(crate) enum Plan {
    /// A stream migration (or a stream-format file), as before.
    Stream,
    /// A mapped-ram snapshot file, written or restored.
    File(PathBuf, FileOptions),
}

fn refuse(what: &str, with: &str, why: &str) -> CmdError {
    generic(format!("{what} cannot be combined with {with}: {why}"))
}

const LOCAL_WHY: &str = "local mode hands guest memory over instead of sending pages; turn it off";

/// Local mode's refusals, for both sides.
fn check_local(p: &Params, tls: bool, uri: &Uri) -> Result<(), CmdError> {
    if !matches!(uri, Uri::Unix(_)) {
        return Err(generic(format!(
            "mode 'local' hands memory descriptors to a process on this host: it needs a unix: URI, not {uri}"
        )));
    }
    let bad = match (tls, check_params(p)) {
        (true, _) => Some(LocalUnsupported::Tls),
        (false, Err(u)) => Some(u),
        (false, Ok(())) => None,
    };
    match bad {
        Some(u) => {
            let mut with = u.qmp_name().to_string();
            if let LocalUnsupported::Channels(n) = u {
                with.push_str(&format!(" (multifd-channels {n})"));
            }
            Err(refuse("mode 'local'", &with, LOCAL_WHY))
        }
        None => Ok(()),
    }
}

/// The settings a snapshot file cannot honour.
fn check_file_caps(what: &str, p: &Params, tls: bool, background: bool) -> Result<(), CmdError> {
    let why = "a snapshot file holds each page once, as it is in memory";
    if p.xbzrle {
        return Err(refuse(what, "capability 'xbzrle'", why));
    }
    if p.compress.is_some() {
        return Err(refuse(what, "parameter 'multifd-compression'", why));
    }
    if p.postcopy_ram {
        return Err(refuse(
            what,
            "capability 'postcopy-ram'",
            "a file has no destination to switch to",
        ));
    }
    if p.postcopy_preempt {
        return Err(refuse(
            what,
            "capability 'postcopy-preempt'",
            "a file has no destination to switch to",
        ));
    }
    if tls {
        return Err(refuse(
            what,
            "parameter 'tls-creds'",
            "a file is not a connection",
        ));
    }
    if background && p.auto_converge {
        return Err(refuse(
            what,
            "capability 'auto-converge'",
            "a background snapshot never waits for the guest to converge",
        ));
    }
    Ok(())
}

/// Threads for a snapshot file: `multifd-channels` with `multifd` on.
fn threads(p: &Params) -> usize {
    if p.channels > 1 {
        usize::from(p.channels)
    } else {
        crate::snapshot::default_threads()
    }
}

impl FileSide {
    /// Checks `migrate URI` against the settings and says what it becomes.
    pub(crate) fn plan_outgoing(&self, p: &Params, tls: bool, uri: &Uri) -> Result<Plan, CmdError> {
        let file_caps = self.mapped_ram || self.background_snapshot;
        if p.mode == MigrationMode::Local {
            check_local(p, tls, uri)?;
            if file_caps {
                let cap = if self.mapped_ram {
                    "capability 'mapped-ram'"
                } else {
                    "capability 'background-snapshot'"
                };
                return Err(refuse(
                    "mode 'local'",
                    cap,
                    "local mode hands memory to a live process, it writes no file",
                ));
            }
            return Ok(Plan::Stream);
        }
        if !file_caps {
            return Ok(Plan::Stream);
        }
        let what = if self.background_snapshot {
            "capability 'background-snapshot'"
        } else {
            "capability 'mapped-ram'"
        };
        let Uri::File(path) = uri else {
            return Err(generic(format!(
                "{what} writes a snapshot file: it needs a file: URI, not {uri}"
            )));
        };
        check_file_caps(what, p, tls, self.background_snapshot)?;
        Ok(Plan::File(
            path.clone(),
            FileOptions {
                mapped_ram: true,
                background_snapshot: self.background_snapshot,
                lazy: false,
                threads: threads(p),
                direct_io: self.direct_io,
            },
        ))
    }

    /// Checks `migrate-incoming URI` against the settings and says what it
    /// becomes.
    pub(crate) fn plan_incoming(&self, p: &Params, tls: bool, uri: &Uri) -> Result<Plan, CmdError> {
        if p.mode == MigrationMode::Local {
            check_local(p, tls, uri)?;
            if self.lazy {
                return Err(refuse(
                    "mode 'local'",
                    "parameter 'x-livemig-lazy'",
                    "a local migration maps the source's memory, there is no file to restore from",
                ));
            }
            if self.mapped_ram {
                return Err(refuse(
                    "mode 'local'",
                    "capability 'mapped-ram'",
                    "a local migration reads no file",
                ));
            }
            return Ok(Plan::Stream);
        }
        let path = match uri {
            Uri::File(path) => path,
            _ if self.lazy => {
                return Err(generic(format!(
                    "parameter 'x-livemig-lazy' restores a mapped-ram file: it needs a file: URI, not {uri}"
                )))
            }
            _ if self.mapped_ram => {
                return Err(generic(format!(
                    "capability 'mapped-ram' reads a snapshot file: it needs a file: URI, not {uri}"
                )))
            }
            _ => return Ok(Plan::Stream),
        };
        let mapped = crate::snapshot::is_mapped_ram(path);
        if !mapped && (self.lazy || self.mapped_ram) {
            let what = if self.lazy {
                "parameter 'x-livemig-lazy'"
            } else {
                "capability 'mapped-ram'"
            };
            return Err(generic(not_mapped_ram(what, path)));
        }
        if !mapped {
            return Ok(Plan::Stream);
        }
        check_file_caps("a mapped-ram restore", p, tls, false)?;
        Ok(Plan::File(
            path.clone(),
            FileOptions {
                mapped_ram: true,
                background_snapshot: false,
                lazy: self.lazy,
                threads: threads(p),
                direct_io: false,
            },
        ))
    }
}

fn not_mapped_ram(what: &str, path: &Path) -> String {
    if !path.exists() {
        return format!("{what}: {}: no such file", path.display());
    }
    format!(
        "{what} needs a mapped-ram snapshot file, and {} is not one (it does not start with the LMMAPRAM magic)",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uri(s: &str) -> Uri {
        s.parse().unwrap()
    }

    fn local() -> Params {
        Params {
            mode: MigrationMode::Local,
            ..Params::default()
        }
    }

    fn err(r: Result<Plan, CmdError>) -> String {
        match r {
            Err(e) => e.desc,
            Ok(p) => panic!("accepted: {p:?}"),
        }
    }

    #[test]
    fn local_mode_names_what_it_refuses() {
        let f = FileSide::default();
        let u = uri("unix:/tmp/x.sock");
        assert!(matches!(
            f.plan_outgoing(&local(), false, &u),
            Ok(Plan::Stream)
        ));
        let p = Params {
            channels: 4,
            ..local()
        };
        let e = err(f.plan_outgoing(&p, false, &u));
        assert!(
            e.contains("capability 'multifd' (multifd-channels 4)"),
            "{e}"
        );
        let p = Params {
            xbzrle: true,
            ..local()
        };
        assert!(err(f.plan_incoming(&p, false, &u)).contains("capability 'xbzrle'"));
        let e = err(f.plan_outgoing(&local(), true, &u));
        assert!(
            e.contains("parameter 'tls-creds'") && e.contains("mode 'local'"),
            "{e}"
        );
        let e = err(f.plan_outgoing(&local(), false, &uri("tcp:127.0.0.1:4444")));
        assert!(e.contains("unix: URI"), "{e}");
        let lazy = FileSide {
            lazy: true,
            ..FileSide::default()
        };
        assert!(err(lazy.plan_incoming(&local(), false, &u)).contains("x-livemig-lazy"));
        let mapped = FileSide {
            mapped_ram: true,
            ..FileSide::default()
        };
        assert!(err(mapped.plan_outgoing(&local(), false, &u)).contains("'mapped-ram'"));
    }

    #[test]
    fn snapshot_capabilities_need_a_file_and_refuse_page_encodings() {
        let bg = FileSide {
            background_snapshot: true,
            direct_io: true,
            ..FileSide::default()
        };
        let p = Params {
            channels: 3,
            ..Params::default()
        };
        match bg.plan_outgoing(&p, false, &uri("file:/tmp/snap")) {
            Ok(Plan::File(path, o)) => {
                assert_eq!(path, PathBuf::from("/tmp/snap"));
                assert!(o.mapped_ram && o.background_snapshot && o.direct_io && !o.lazy);
                assert_eq!(o.threads, 3);
            }
            other => panic!("{other:?}"),
        }
        let e = err(bg.plan_outgoing(&p, false, &uri("tcp:127.0.0.1:1")));
        assert!(
            e.contains("'background-snapshot'") && e.contains("file: URI"),
            "{e}"
        );
        let p = Params {
            auto_converge: true,
            ..Params::default()
        };
        assert!(err(bg.plan_outgoing(&p, false, &uri("file:/tmp/s"))).contains("auto-converge"));
        let mapped = FileSide {
            mapped_ram: true,
            ..FileSide::default()
        };
        let p = Params {
            xbzrle: true,
            ..Params::default()
        };
        let e = err(mapped.plan_outgoing(&p, false, &uri("file:/tmp/s")));
        assert!(
            e.contains("capability 'mapped-ram'") && e.contains("'xbzrle'"),
            "{e}"
        );
        let p = Params {
            postcopy_ram: true,
            ..Params::default()
        };
        assert!(err(mapped.plan_outgoing(&p, false, &uri("file:/tmp/s"))).contains("postcopy-ram"));
        assert!(
            err(mapped.plan_outgoing(&Params::default(), true, &uri("file:/tmp/s")))
                .contains("tls-creds")
        );
        // Without the capabilities, file: stays the stream format.
        let plain = FileSide::default();
        assert!(matches!(
            plain.plan_outgoing(&Params::default(), false, &uri("file:/tmp/s")),
            Ok(Plan::Stream)
        ));
    }

    #[test]
    fn a_restore_recognises_mapped_ram_files() {
        let dir = tempfile::tempdir().unwrap();
        let stream = dir.path().join("stream");
        std::fs::write(&stream, b"LVMGSTRMnot mapped ram").unwrap();
        let mapped = dir.path().join("mapped");
        let mem = crate::memory::ProcessMemory::new(&[("ram", 1 << 20)]).unwrap();
        crate::snapshot::save(&mem, &mapped, b"", &crate::snapshot::SaveOptions::default())
            .unwrap();
        let u = |p: &Path| uri(&format!("file:{}", p.display()));
        let plain = FileSide::default();
        let p = Params::default();
        assert!(matches!(
            plain.plan_incoming(&p, false, &u(&stream)),
            Ok(Plan::Stream)
        ));
        match plain.plan_incoming(&p, false, &u(&mapped)) {
            Ok(Plan::File(_, o)) => assert!(o.mapped_ram && !o.lazy),
            other => panic!("{other:?}"),
        }
        let lazy = FileSide {
            lazy: true,
            ..FileSide::default()
        };
        match lazy.plan_incoming(&p, false, &u(&mapped)) {
            Ok(Plan::File(_, o)) => assert!(o.lazy),
            other => panic!("{other:?}"),
        }
        let e = err(lazy.plan_incoming(&p, false, &u(&stream)));
        assert!(
            e.contains("x-livemig-lazy") && e.contains("LMMAPRAM"),
            "{e}"
        );
        let e = err(lazy.plan_incoming(&p, false, &u(&dir.path().join("none"))));
        assert!(e.contains("no such file"), "{e}");
        let e = err(lazy.plan_incoming(&p, false, &uri("tcp:127.0.0.1:1")));
        assert!(e.contains("file: URI"), "{e}");
        let cap = FileSide {
            mapped_ram: true,
            ..FileSide::default()
        };
        assert!(err(cap.plan_incoming(&p, false, &u(&stream))).contains("capability 'mapped-ram'"));
    }
}
