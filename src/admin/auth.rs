//! Bearer tokens of the admin API: where they come from and what each may
//! do.
//!
//! A token has a name (what the audit trail records as who), a scope and a
//! secret. `read` reads every JSON endpoint; `admin` also calls the
//! mutating ones. Tokens come from the environment variable `tokens_env`
//! (`name:scope:secret`, separated by commas or white space) and from
//! `tokens_file` (one `name scope secret` per line, `#` comments), which is
//! refused when anyone but its owner may read or write it: a secret there
//! is a key to every site's data.
//!
//! Secrets are compared in constant time, and never logged: what the log
//! and the audit trail name is the token's name.

use std::path::Path;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    Read,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Option<Scope> {
        match text {
            "read" => Some(Scope::Read),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

/// One token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub name: String,
    pub scope: Scope,
    secret: Vec<u8>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("scope", &self.scope)
            .field("secret", &"…")
            .finish()
    }
}

/// The shortest secret accepted: a guessable token is no protection.
pub const MIN_SECRET: usize = 16;

/// The tokens of a listener.
#[derive(Debug, Clone, Default)]
pub struct Tokens(Vec<Token>);

/// Who a request is, once its token is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub scope: Scope,
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// No token, or one that matches none (401).
    Unauthenticated(&'static str),
    /// A known token without the scope the call needs (403).
    Forbidden { name: String, needs: Scope },
}

impl Tokens {
    /// Reads the tokens of `[admin]`: the environment variable, then the
    /// file. Errors name the variable or the file and the line.
    pub fn load(env_var: &str, file: Option<&Path>) -> Result<Tokens, String> {
        let mut tokens = Vec::new();
        if let Ok(text) = std::env::var(env_var) {
            for (i, item) in text
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|s| !s.is_empty())
                .enumerate()
            {
                let parts: Vec<&str> = item.splitn(3, ':').collect();
                tokens.push(token(&parts).map_err(|e| format!("{env_var}, token {}: {e}", i + 1))?);
            }
        }
        if let Some(path) = file {
            check_private(path)?;
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("admin.tokens_file {}: {e}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let parts: Vec<&str> = line.split_whitespace().collect();
                tokens.push(token(&parts).map_err(|e| {
                    format!("admin.tokens_file {}, line {}: {e}", path.display(), n + 1)
                })?);
            }
        }
        let mut names: Vec<&str> = tokens.iter().map(|t| t.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(format!(
                "two admin tokens are named `{}`: the audit trail could not tell them apart",
                w[0]
            ));
        }
        Ok(Tokens(tokens))
    }

    pub fn from_list(tokens: Vec<Token>) -> Tokens {
        Tokens(tokens)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The caller of a request with this `Authorization` header value, if
    /// it may do what needs `needs`.
    pub fn check(&self, authorization: Option<&str>, needs: Scope) -> Result<Caller, Refused> {
        let Some(value) = authorization else {
            return Err(Refused::Unauthenticated(
                "no token: send `Authorization: Bearer <token>`",
            ));
        };
        let Some(secret) = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
        else {
            return Err(Refused::Unauthenticated(
                "the Authorization header is not `Bearer <token>`",
            ));
        };
        // Every token is compared, so that the time does not tell which
        // one came close.
        let mut found: Option<&Token> = None;
        for t in &self.0 {
            if same(t.secret.as_slice(), secret.trim().as_bytes()) {
                found = Some(t);
            }
        }
        let Some(t) = found else {
            return Err(Refused::Unauthenticated("unknown token"));
        };
        if t.scope < needs {
            return Err(Refused::Forbidden {
                name: t.name.clone(),
                needs,
            });
        }
        Ok(Caller {
            name: t.name.clone(),
            scope: t.scope,
        })
    }
}

impl Token {
    pub fn new(name: &str, scope: Scope, secret: &str) -> Token {
        Token {
            name: name.to_string(),
            scope,
            secret: secret.as_bytes().to_vec(),
        }
    }
}

fn token(parts: &[&str]) -> Result<Token, String> {
    let [name, scope, secret] = parts else {
        return Err("expected three parts: name, scope (read or admin), secret".into());
    };
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        return Err(format!("the name `{name}` is not letters, digits, - _ . @"));
    }
    let scope = Scope::parse(scope)
        .ok_or_else(|| format!("token `{name}`: the scope `{scope}` is neither read nor admin"))?;
    if secret.len() < MIN_SECRET {
        return Err(format!(
            "token `{name}`: its secret is shorter than {MIN_SECRET} characters (make one with `openssl rand -hex 24`)"
        ));
    }
    Ok(Token::new(name, scope, secret))
}

/// Refuses a file that others than its owner may read or write.
fn check_private(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("admin.tokens_file {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "admin.tokens_file {} is readable or writable by others than its owner (mode {mode:03o}): its secrets open every site's data; run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// Constant-time equality of two byte strings (the length is not hidden).
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const R: &str = "read-secret-0123456789";
    const A: &str = "admin-secret-0123456789";

    fn tokens() -> Tokens {
        Tokens::from_list(vec![
            Token::new("grafana", Scope::Read, R),
            Token::new("alice", Scope::Admin, A),
        ])
    }

    #[test]
    fn scopes_decide_what_a_token_may_call() {
        let t = tokens();
        let bearer = |s: &str| format!("Bearer {s}");
        assert!(matches!(
            t.check(None, Scope::Read),
            Err(Refused::Unauthenticated(_))
        ));
        assert!(matches!(
            t.check(Some("Bearer nope-nope-nope-nope"), Scope::Read),
            Err(Refused::Unauthenticated("unknown token"))
        ));
        assert!(matches!(
            t.check(Some(R), Scope::Read),
            Err(Refused::Unauthenticated(_))
        ));
        assert_eq!(
            t.check(Some(&bearer(R)), Scope::Read).unwrap().name,
            "grafana"
        );
        assert_eq!(
            t.check(Some(&bearer(R)), Scope::Admin),
            Err(Refused::Forbidden {
                name: "grafana".into(),
                needs: Scope::Admin
            })
        );
        let alice = t.check(Some(&bearer(A)), Scope::Admin).unwrap();
        assert_eq!((alice.name.as_str(), alice.scope), ("alice", Scope::Admin));
        assert_eq!(
            t.check(Some(&bearer(A)), Scope::Read).unwrap().name,
            "alice"
        );
    }

    #[test]
    fn tokens_come_from_the_environment_and_a_private_file() {
        let var = "SITESYNC_TEST_TOKENS_AUTH";
        // SAFETY: this test alone uses this variable.
        unsafe { std::env::set_var(var, format!("grafana:read:{R}, alice:admin:{A}")) };
        let dir = std::env::temp_dir().join(format!("sitesync-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("tokens");
        std::fs::write(&file, "# ops\nbob admin bob-secret-0123456789\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let t = Tokens::load(var, Some(&file)).unwrap();
        assert_eq!(t.0.len(), 3);
        assert_eq!(
            t.check(Some("Bearer bob-secret-0123456789"), Scope::Admin)
                .unwrap()
                .name,
            "bob"
        );
        // Readable by others: refused, naming the fix.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Tokens::load(var, Some(&file)).unwrap_err();
        assert!(e.contains("mode 644") && e.contains("chmod 600"), "{e}");
        // Bad lines name where they are.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&file, "bob owner bob-secret-0123456789\n").unwrap();
        let e = Tokens::load(var, Some(&file)).unwrap_err();
        assert!(
            e.contains("line 1") && e.contains("neither read nor admin"),
            "{e}"
        );
        std::fs::write(&file, "bob admin short\n").unwrap();
        let e = Tokens::load(var, Some(&file)).unwrap_err();
        assert!(e.contains("shorter than 16"), "{e}");
        std::fs::write(&file, format!("alice admin {A}x\n")).unwrap();
        let e = Tokens::load(var, Some(&file)).unwrap_err();
        assert!(e.contains("two admin tokens are named `alice`"), "{e}");
        // SAFETY: as above.
        unsafe { std::env::remove_var(var) };
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_token_never_shows_its_secret() {
        let shown = format!("{:?}", Token::new("alice", Scope::Admin, A));
        assert!(!shown.contains(A), "{shown}");
    }
}
