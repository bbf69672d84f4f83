//! The member address: `iscsi://[user[%password]@]host[:port]/target-iqn/lun`, the form
//! qemu and libiscsi use.

use super::{IscsiError, DEFAULT_PORT};

/// A parsed iSCSI URL. `Debug` and [`IscsiUrl::redacted`] never show the password.
#[derive(Clone, PartialEq, Eq)]
pub struct IscsiUrl {
    pub host: String,
    pub port: u16,
    /// Empty for a discovery-only URL (`iscsi://host[:port]`).
    pub target: String,
    pub lun: u16,
    pub user: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for IscsiUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IscsiUrl({})", self.redacted())
    }
}

impl IscsiUrl {
    /// Parse a member URL (target and LUN required).
    pub fn parse(text: &str) -> Result<Self, IscsiError> {
        let u = Self::parse_any(text)?;
        if u.target.is_empty() {
            return Err(bad(text, "it names no target IQN and LUN"));
        }
        Ok(u)
    }

    /// Parse a member URL or a portal alone (`iscsi://host[:port][/]`, for discovery).
    pub fn parse_any(text: &str) -> Result<Self, IscsiError> {
        let text = text.trim();
        let rest = text
            .strip_prefix("iscsi://")
            .or_else(|| text.strip_prefix("ISCSI://"))
            .ok_or_else(|| bad(text, "it does not start with iscsi://"))?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (auth, hostport) = match authority.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, authority),
        };
        let (host, port) =
            crate::addr::host_port(hostport, DEFAULT_PORT).map_err(|w| bad(text, &w))?;
        let (user, password) = match auth {
            None => (None, None),
            Some(a) => {
                let (u, p) = a.split_once('%').map_or((a, None), |(u, p)| (u, Some(p)));
                if u.is_empty() {
                    return Err(bad(text, "the CHAP user before '@' is empty"));
                }
                (Some(u.to_string()), p.map(str::to_string))
            }
        };
        let path = path.trim_end_matches('/');
        let (target, lun) = if path.is_empty() {
            (String::new(), 0)
        } else {
            let (t, l) = path
                .rsplit_once('/')
                .ok_or_else(|| bad(text, "the path must be /target-iqn/lun"))?;
            let lun = l
                .parse::<u16>()
                .ok()
                .filter(|&l| l < 16384)
                .ok_or_else(|| bad(text, &format!("'{l}' is not a LUN number")))?;
            if t.is_empty() {
                return Err(bad(text, "the target IQN is empty"));
            }
            (t.to_string(), lun)
        };
        Ok(IscsiUrl {
            host,
            port,
            target,
            lun,
            user,
            password,
        })
    }

    /// `host:port` (IPv6 in brackets), for connecting and messages.
    pub fn portal(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The URL with any password replaced by `***`: what logs and status may show.
    pub fn redacted(&self) -> String {
        let auth = match (&self.user, &self.password) {
            (Some(u), Some(_)) => format!("{u}%***@"),
            (Some(u), None) => format!("{u}@"),
            _ => String::new(),
        };
        if self.target.is_empty() {
            format!("iscsi://{auth}{}", self.portal())
        } else {
            format!(
                "iscsi://{auth}{}/{}/{}",
                self.portal(),
                self.target,
                self.lun
            )
        }
    }
}

fn bad(url: &str, why: &str) -> IscsiError {
    IscsiError::BadUrl {
        url: redact_text(url),
        why: why.to_string(),
    }
}

/// Hide what looks like a password in a URL that did not parse.
pub fn redact_text(url: &str) -> String {
    let Some(rest) = url.strip_prefix("iscsi://") else {
        return url.to_string();
    };
    let authority = rest.split('/').next().unwrap_or("");
    match authority.rsplit_once('@') {
        Some((auth, _)) if auth.contains('%') => {
            let user = auth.split('%').next().unwrap_or("");
            format!("iscsi://{user}%***@{}", &rest[auth.len() + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_url() {
        let u =
            IscsiUrl::parse("iscsi://alice%s3cret@10.0.0.2:3261/iqn.2003-01.org.x:t1/2").unwrap();
        assert_eq!(u.host, "10.0.0.2");
        assert_eq!(u.port, 3261);
        assert_eq!(u.target, "iqn.2003-01.org.x:t1");
        assert_eq!(u.lun, 2);
        assert_eq!(u.user.as_deref(), Some("alice"));
        assert_eq!(u.password.as_deref(), Some("s3cret"));
        assert_eq!(
            u.redacted(),
            "iscsi://alice%***@10.0.0.2:3261/iqn.2003-01.org.x:t1/2"
        );
        assert!(!format!("{u:?}").contains("s3cret"));
    }

    #[test]
    fn defaults_and_portals() {
        let u = IscsiUrl::parse("iscsi://h/iqn.x/0").unwrap();
        assert_eq!((u.port, u.user.clone()), (3260, None));
        let u = IscsiUrl::parse("iscsi://[::1]:3300/iqn.x/1").unwrap();
        assert_eq!(u.portal(), "[::1]:3300");
        let p = IscsiUrl::parse_any("iscsi://127.0.0.1:3333").unwrap();
        assert!(p.target.is_empty());
        assert_eq!(p.redacted(), "iscsi://127.0.0.1:3333");
    }

    #[test]
    fn bad_urls_say_why_without_the_password() {
        for (text, why) in [
            ("nbd://h/x", "iscsi://"),
            ("iscsi://h", "no target"),
            ("iscsi://h/iqn.x", "/target-iqn/lun"),
            ("iscsi://h/iqn.x/abc", "not a LUN"),
            ("iscsi://h:0/iqn.x/1", "port"),
            ("iscsi://%pw@h/iqn.x/1", "user"),
            ("iscsi://u%topsecret@h/iqn.x/x", "not a LUN"),
        ] {
            let e = IscsiUrl::parse(text).unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
            assert!(!e.contains("topsecret"), "{e}");
        }
    }
}
