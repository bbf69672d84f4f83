//! The layout file (TOML): which arrays to run, over which members, exported how. It is the
//! source of truth until members carry enough metadata to assemble without it. Everything
//! a person can get wrong here is caught at load time with a message naming the array,
//! the field and the fix.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use raidcore::LevelKind;
use serde::{Deserialize, Serialize};

pub const DEFAULT_CHUNK: u64 = 64 << 10;
pub const DEFAULT_QUEUE_DEPTH: usize = 256;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon: Option<DaemonSection>,
    #[serde(default)]
    pub array: Vec<ArrayLayout>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DaemonSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mgmt_socket: Option<PathBuf>,
}

/// A size written as bytes (`65536`) or with a unit (`"64KiB"`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    pub fn bytes(&self) -> Result<u64> {
        match self {
            SizeValue::Bytes(b) => Ok(*b),
            SizeValue::Text(t) => parse_size(t),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArrayLayout {
    pub name: String,
    pub level: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<SizeValue>,
    pub members: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_depth: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    #[serde(default)]
    pub export: ExportSection,
    /// Settings for this array's remote members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteSection>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteSection {
    /// Per-request deadline, e.g. "30s", "500ms" (retries after reconnects included).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Connections per member where the server allows several (1-16).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
    /// CHAP for this array's iSCSI members.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iscsi: Option<IscsiSection>,
}

/// `[array.remote.iscsi]`: CHAP credentials. Each secret is given once, as text in the
/// layout, as a file the layout names, or as an environment variable of ublkd; secrets
/// are read when a member opens and never logged or shown in status.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IscsiSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap_secret_file: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chap_secret_env: Option<String>,
    /// The target's name and secret, for mutual CHAP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_secret_file: Option<std::path::PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutual_secret_env: Option<String>,
}

impl IscsiSection {
    fn auth(&self, array: &str) -> Result<backends::iscsi::IscsiAuth> {
        Ok(backends::iscsi::IscsiAuth {
            chap: chap_source(
                array,
                "chap",
                &self.chap_user,
                &self.chap_secret,
                &self.chap_secret_file,
                &self.chap_secret_env,
            )?,
            mutual: chap_source(
                array,
                "mutual",
                &self.mutual_user,
                &self.mutual_secret,
                &self.mutual_secret_file,
                &self.mutual_secret_env,
            )?,
        })
    }
}

/// A user with exactly one of the three ways to give its secret.
fn chap_source(
    array: &str,
    key: &str,
    user: &Option<String>,
    secret: &Option<String>,
    file: &Option<std::path::PathBuf>,
    env: &Option<String>,
) -> Result<Option<backends::iscsi::ChapSource>> {
    use backends::iscsi::SecretSource;
    let mut given = Vec::new();
    if let Some(s) = secret {
        given.push(SecretSource::Inline(s.clone()));
    }
    if let Some(f) = file {
        if !f.is_absolute() {
            bail!("array {array}: remote.iscsi.{key}_secret_file must be an absolute path");
        }
        given.push(SecretSource::File(f.clone()));
    }
    if let Some(e) = env {
        given.push(SecretSource::Env(e.clone()));
    }
    match (user, given.len()) {
        (None, 0) => Ok(None),
        (None, _) => bail!("array {array}: remote.iscsi has a {key} secret but no {key}_user"),
        (Some(u), 1) if !u.is_empty() => Ok(Some(backends::iscsi::ChapSource {
            user: u.clone(),
            secret: given.remove(0),
        })),
        (Some(_), 1) => bail!("array {array}: remote.iscsi.{key}_user is empty"),
        (Some(_), 0) => bail!(
            "array {array}: remote.iscsi.{key}_user needs a secret: give one of {key}_secret, {key}_secret_file or {key}_secret_env"
        ),
        (Some(_), _) => bail!(
            "array {array}: remote.iscsi: give only one of {key}_secret, {key}_secret_file and {key}_secret_env"
        ),
    }
}

/// Parse "30s", "500ms", "2m", "1h", or bare seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().with_context(|| {
        format!("duration '{s}' does not start with a number (write e.g. 30s or 500ms)")
    })?;
    let ms = match unit.trim() {
        "ms" => n,
        "" | "s" => n.saturating_mul(1000),
        "m" | "min" => n.saturating_mul(60_000),
        "h" => n.saturating_mul(3_600_000),
        u => bail!("duration '{s}' has unknown unit '{u}' (use ms, s, m or h)"),
    };
    Ok(std::time::Duration::from_millis(ms))
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbd: Option<NbdExport>,
    /// The ublk frontend's settings (`{ id = "auto", queues, depth, max_io }`, or
    /// `{ enabled = false }`); absent means on with the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ublk: Option<crate::ublk::UblkLayout>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdExport {
    pub listen: Vec<String>,
    /// Export name; the array's name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// Where an NBD listener binds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl ListenAddr {
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                bail!("listen address '{s}' names no socket path (write unix:/run/uniblk/x.sock)");
            }
            return Ok(ListenAddr::Unix(PathBuf::from(p)));
        }
        s.parse::<SocketAddr>().map(ListenAddr::Tcp).with_context(|| {
            format!("listen address '{s}' is neither HOST:PORT (e.g. 127.0.0.1:10809, [::1]:10809) nor unix:/path")
        })
    }
}

/// A validated array, ready for the daemon.
#[derive(Debug, Clone)]
pub struct ArrayPlan {
    pub name: String,
    pub level: LevelKind,
    pub chunk: u64,
    pub members: Vec<String>,
    pub queue_depth: usize,
    pub policy: String,
    pub nbd_name: String,
    pub nbd_description: String,
    pub nbd_listen: Vec<ListenAddr>,
    /// None when the layout turns the ublk export off.
    pub ublk: Option<crate::ublk::UblkPlan>,
    pub remote: backends::addr::RemoteOptions,
}

/// Sizes in layout files use the same syntax as member addresses (`64KiB`, `1GiB`, `512`).
pub fn parse_size(s: &str) -> Result<u64> {
    Ok(backends::addr::parse_size(s)?)
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// The member's identity for duplicate detection: files by their real path.
fn member_key(m: &str) -> String {
    for scheme in ["file:", "dev:"] {
        if let Some(p) = m.strip_prefix(scheme) {
            let real = std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p));
            return format!("path:{}", real.display());
        }
    }
    m.to_string()
}

impl Layout {
    pub fn load(path: &Path) -> Result<Layout> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read layout file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("layout file {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Layout> {
        Ok(toml::from_str(text)?)
    }

    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// Check everything that can be checked without opening members.
    pub fn plan(&self) -> Result<Vec<ArrayPlan>> {
        if self.array.is_empty() {
            bail!("no arrays defined: add an [[array]] table with name, level and members");
        }
        let mut names = HashMap::new();
        let mut members: HashMap<String, String> = HashMap::new();
        let mut exports: BTreeMap<(ListenAddr, String), String> = BTreeMap::new();
        let mut plans = Vec::new();
        for a in &self.array {
            let p = a.plan()?;
            if names.insert(p.name.clone(), ()).is_some() {
                bail!(
                    "array name '{}' is used twice; array names must be unique",
                    p.name
                );
            }
            for m in &p.members {
                if let Some(other) = members.insert(member_key(m), p.name.clone()) {
                    let where_ = if other == p.name {
                        format!("twice in array {}", p.name)
                    } else {
                        format!("in arrays {} and {}", other, p.name)
                    };
                    bail!("member {m} appears {where_}; every member may be used once");
                }
            }
            for l in &p.nbd_listen {
                if let Some(other) = exports.insert((l.clone(), p.nbd_name.clone()), p.name.clone())
                {
                    bail!(
                        "arrays {other} and {} both export NBD name '{}' on {l}; give one a different export.nbd.name",
                        p.name, p.nbd_name
                    );
                }
            }
            plans.push(p);
        }
        check_ublk_ids(&plans)?;
        Ok(plans)
    }
}

/// Two arrays cannot both ask for /dev/ublkbN.
fn check_ublk_ids(plans: &[ArrayPlan]) -> Result<()> {
    let mut ids: HashMap<u32, &str> = HashMap::new();
    for p in plans {
        if let Some(id) = p.ublk.as_ref().and_then(|u| u.id) {
            if let Some(other) = ids.insert(id, &p.name) {
                bail!(
                    "arrays {other} and {} both ask for ublk id {id}; give one another id or id = \"auto\"",
                    p.name
                );
            }
        }
    }
    Ok(())
}

impl ArrayLayout {
    fn remote_options(&self) -> Result<backends::addr::RemoteOptions> {
        let name = &self.name;
        let mut o = backends::addr::RemoteOptions::default();
        let Some(r) = &self.remote else { return Ok(o) };
        if let Some(t) = &r.timeout {
            o.timeout =
                parse_duration(t).with_context(|| format!("array {name}: remote.timeout"))?;
            if o.timeout < std::time::Duration::from_millis(100) {
                bail!("array {name}: remote.timeout {t} is too short (at least 100ms)");
            }
        }
        if let Some(c) = r.connections {
            if !(1..=16).contains(&c) {
                bail!("array {name}: remote.connections {c} must be between 1 and 16");
            }
            o.connections = c;
        }
        if let Some(i) = &r.iscsi {
            o.iscsi = i.auth(name)?;
        }
        Ok(o)
    }

    fn plan(&self) -> Result<ArrayPlan> {
        let name = &self.name;
        if !valid_name(name) {
            bail!("array name '{name}' is invalid: use 1-64 letters, digits, '.', '_' or '-'");
        }
        let level = LevelKind::parse(&self.level).with_context(|| {
            format!(
                "array {name}: unknown level '{}' (choose linear, raid0, raid1 or raid10)",
                self.level
            )
        })?;
        if self.members.len() < level.min_members() {
            bail!(
                "array {name}: {} needs at least {} members, the layout names {}",
                level.name(),
                level.min_members(),
                self.members.len()
            );
        }
        let chunk = match &self.chunk {
            Some(c) => c.bytes().with_context(|| format!("array {name}: chunk"))?,
            None => DEFAULT_CHUNK,
        };
        if level.uses_chunk() && (chunk < 4096 || !chunk.is_power_of_two() || chunk > 1 << 30) {
            bail!("array {name}: chunk {chunk} bytes must be a power of two from 4KiB to 1GiB (e.g. chunk = \"64KiB\")");
        }
        let queue_depth = self.queue_depth.unwrap_or(DEFAULT_QUEUE_DEPTH);
        if !(1..=65536).contains(&queue_depth) {
            bail!("array {name}: queue_depth {queue_depth} must be between 1 and 65536");
        }
        let policy = self.policy.clone().unwrap_or_else(|| "fifo".into());
        if raidcore::queue::policy_by_name(&policy).is_none() {
            bail!(
                "array {name}: unknown policy '{policy}' (choose one of: {})",
                raidcore::queue::POLICY_NAMES.join(", ")
            );
        }
        let nbd = self.export.nbd.clone().unwrap_or_default();
        let nbd_listen = nbd
            .listen
            .iter()
            .map(|l| {
                ListenAddr::parse(l).with_context(|| format!("array {name}: export.nbd.listen"))
            })
            .collect::<Result<Vec<_>>>()?;
        let remote = self.remote_options()?;
        Ok(ArrayPlan {
            remote,
            name: name.clone(),
            level,
            chunk,
            members: self.members.clone(),
            queue_depth,
            policy,
            nbd_name: nbd.name.clone().unwrap_or_else(|| name.clone()),
            nbd_description: nbd
                .description
                .clone()
                .unwrap_or_else(|| format!("uniblk {} array {name}", level.name())),
            nbd_listen,
            ublk: crate::ublk::plan(name, self.export.ublk.as_ref())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(toml: &str) -> String {
        format!(
            "{:#}",
            Layout::parse(toml).and_then(|l| l.plan()).unwrap_err()
        )
    }

    #[test]
    fn design_example_parses() {
        let l = Layout::parse(
            r#"
[[array]]
name = "data0"
level = "raid1"
chunk = "64KiB"
members = ["file:/var/lib/uniblk/a.img", "nbd://10.0.0.2/disk"]
export.nbd = { listen = ["127.0.0.1:10809", "unix:/run/uniblk/data0.sock"] }
export.ublk = { id = "auto" }
"#,
        )
        .unwrap();
        let p = l.plan().unwrap();
        assert_eq!(p[0].level, LevelKind::Raid1);
        assert_eq!(p[0].chunk, 65536);
        assert_eq!(p[0].nbd_listen.len(), 2);
        assert_eq!(p[0].nbd_name, "data0");
    }

    #[test]
    fn iscsi_chap_from_layout_file_or_env() {
        use backends::iscsi::SecretSource;
        let base = "[[array]]\nname = \"a\"\nlevel = \"raid1\"\nmembers = [\"mem:1G\", \"iscsi://h/iqn.x:t/1\"]\n";
        let plan = |extra: &str| Layout::parse(&format!("{base}{extra}")).and_then(|l| l.plan());
        let p = plan("remote.iscsi = { chap_user = \"u\", chap_secret_env = \"S\", mutual_user = \"t\", mutual_secret_file = \"/etc/t\" }").unwrap();
        let auth = &p[0].remote.iscsi;
        let chap = auth.chap.as_ref().unwrap();
        assert_eq!(
            (chap.user.as_str(), &chap.secret),
            ("u", &SecretSource::Env("S".into()))
        );
        assert_eq!(
            auth.mutual.as_ref().unwrap().secret,
            SecretSource::File("/etc/t".into())
        );
        let p =
            plan("remote.iscsi = { chap_user = \"u\", chap_secret = \"inline-secret\" }").unwrap();
        assert!(!format!("{:?}", p[0].remote).contains("inline-secret"));
        let e = |extra: &str| format!("{:#}", plan(extra).unwrap_err());
        assert!(e("remote.iscsi = { chap_user = \"u\" }").contains("needs a secret"));
        assert!(e(
            "remote.iscsi = { chap_user = \"u\", chap_secret = \"x\", chap_secret_env = \"E\" }"
        )
        .contains("only one of"));
        assert!(e("remote.iscsi = { chap_secret = \"x\" }").contains("no chap_user"));
        assert!(
            e("remote.iscsi = { chap_user = \"u\", chap_secret_file = \"rel\" }")
                .contains("absolute")
        );
        assert!(e("remote.iscsi = { chap_usr = \"u\" }").contains("unknown field"));
    }

    #[test]
    fn mistakes_get_clear_messages() {
        let one = |body: &str| format!("[[array]]\nname = \"a\"\n{body}\n");
        assert!(err(&one(
            "level = \"raid7\"\nmembers = [\"mem:1G\", \"mem:1G\"]"
        ))
        .contains("unknown level 'raid7'"));
        assert!(err(&one("level = \"raid1\"\nmembers = [\"mem:1G\"]"))
            .contains("raid1 needs at least 2 members, the layout names 1"));
        assert!(err(&one(
            "level = \"raid0\"\nmembers = [\"file:/x\", \"file:/x\"]"
        ))
        .contains("appears twice in array a"));
        assert!(err(&one(
            "level = \"raid0\"\nchunk = \"3KiB\"\nmembers = [\"mem:1G\", \"mem:2G\"]"
        ))
        .contains("power of two"));
        assert!(err(&one("level = \"raid0\"\nmembers = [\"mem:1G\", \"mem:2G\"]\nexport.nbd = { listen = [\"nowhere\"] }")).contains("neither HOST:PORT"));
        assert!(err(&one("level = \"raid0\"\nmembrs = []")).contains("unknown field"));
        assert!(err("").contains("no arrays defined"));
        assert!(
            err("[[array]]\nname = \"a b\"\nlevel = \"linear\"\nmembers = [\"mem:1G\"]")
                .contains("invalid")
        );
    }

    #[test]
    fn ublk_export_is_on_by_default_and_ids_are_unique() {
        let one = |name: &str, ublk: &str| {
            format!("[[array]]\nname = \"{name}\"\nlevel = \"raid1\"\nmembers = [\"file:/nx/{name}a\", \"file:/nx/{name}b\"]\n{ublk}\n")
        };
        let p = Layout::parse(&one("a", "")).unwrap().plan().unwrap();
        assert!(p[0].ublk.is_some(), "on by default");
        let p = Layout::parse(&one("a", "export.ublk = { enabled = false }"))
            .unwrap()
            .plan()
            .unwrap();
        assert!(p[0].ublk.is_none());
        let two = one("a", "export.ublk = { id = 3 }") + &one("b", "export.ublk = { id = 3 }");
        assert!(err(&two).contains("arrays a and b both ask for ublk id 3"));
        assert!(err(&one("a", "export.ublk = { id = \"x\" }")).contains("export.ublk.id"));
    }

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512").unwrap(), 512);
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("KiB").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }
}
