//! Lease ids, slugs and sandbox names (SPEC "Leases").
//!
//! An id is `cbx_` + 12 random lowercase hex digits. The slug is `<adjective>-<crustacean>`
//! picked by a hash of the id, so the same id always reads the same; a collision with a live
//! lease gets a 4-hex suffix. The sandbox name is `crabbox-<slug>-<8hex>`.

use rand::Rng;

const ADJECTIVES: [&str; 40] = [
    "amber", "blue", "bold", "bright", "brisk", "calm", "clever", "coral", "cosmic", "crimson",
    "dapper", "eager", "fancy", "gentle", "glossy", "golden", "happy", "harbor", "jade", "lively",
    "lucky", "mellow", "nimble", "pearl", "plucky", "proud", "quick", "rapid", "salty", "sandy",
    "shiny", "silver", "snappy", "sunny", "swift", "tidal", "tidy", "violet", "witty", "zesty",
];
const NOUNS: [&str; 23] = [
    "amphipod",
    "barnacle",
    "copepod",
    "crab",
    "crayfish",
    "cyclops",
    "daphnia",
    "decapod",
    "fiddler",
    "hermit",
    "isopod",
    "krill",
    "langoustine",
    "lobster",
    "marron",
    "mysid",
    "ostracod",
    "prawn",
    "scampi",
    "shrimp",
    "squilla",
    "woodlouse",
    "yabby",
];

/// The longest slug a user may choose.
pub const MAX_SLUG_LEN: usize = 41;

/// A fresh random lease id: `cbx_` + 12 lowercase hex.
pub fn new_lease_id() -> String {
    let bytes: [u8; 6] = rand::rng().random();
    format!("cbx_{}", hex(&bytes))
}

/// Is `s` shaped like a lease id?
pub fn is_lease_id(s: &str) -> bool {
    s.strip_prefix("cbx_").is_some_and(|h| {
        h.len() == 12
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// The slug an id reads as, before any collision suffix.
pub fn slug_for(id: &str) -> String {
    let h = blake3::hash(id.as_bytes());
    let b = h.as_bytes();
    let n = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let adj = ADJECTIVES[(n % ADJECTIVES.len() as u64) as usize];
    let noun = NOUNS[((n / ADJECTIVES.len() as u64) % NOUNS.len() as u64) as usize];
    format!("{adj}-{noun}")
}

/// The slug with a 4-hex suffix, for when [`slug_for`] collides with a live lease.
pub fn suffixed_slug(base: &str) -> String {
    let bytes: [u8; 2] = rand::rng().random();
    format!("{base}-{}", hex(&bytes))
}

/// Checks a user-chosen slug: lowercase `[a-z0-9-]`, 1 to 41 characters, not starting or
/// ending with `-`. The error says what is allowed.
pub fn validate_slug(slug: &str) -> Result<(), String> {
    let ok_chars = slug
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if slug.is_empty()
        || slug.len() > MAX_SLUG_LEN
        || !ok_chars
        || slug.starts_with('-')
        || slug.ends_with('-')
    {
        return Err(format!(
            "invalid slug {}: use 1 to {MAX_SLUG_LEN} characters of lowercase a-z, 0-9 and \
             '-', not starting or ending with '-' (for example --slug my-feature)",
            crate::error::echo(slug)
        ));
    }
    Ok(())
}

/// The provider sandbox name for a lease: `crabbox-<slug>-<first 8 hex of the id>`.
pub fn sandbox_name(slug: &str, id: &str) -> String {
    let hex_part = id.strip_prefix("cbx_").unwrap_or(id);
    let short: String = hex_part.chars().take(8).collect();
    format!("crabbox-{slug}-{short}")
}

/// A random id for this daemon, used as the `owner` label of its sandboxes.
pub fn new_daemon_id() -> String {
    let bytes: [u8; 8] = rand::rng().random();
    format!("cbxd_{}", hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_spec_shape() {
        for _ in 0..100 {
            let id = new_lease_id();
            assert!(is_lease_id(&id), "{id}");
        }
        assert!(!is_lease_id("cbx_12345"));
        assert!(!is_lease_id("cbx_ABCDEF123456"));
        assert!(!is_lease_id("xyz_abcdef123456"));
    }

    #[test]
    fn slugs_are_stable_and_from_the_lists() {
        let id = "cbx_0123456789ab";
        let slug = slug_for(id);
        assert_eq!(slug, slug_for(id));
        let (adj, noun) = slug.split_once('-').expect("adjective-noun");
        assert!(ADJECTIVES.contains(&adj) && NOUNS.contains(&noun), "{slug}");
        // Every adjective and noun is reachable.
        let mut seen = std::collections::HashSet::new();
        for _ in 0..40_000 {
            seen.insert(slug_for(&new_lease_id()));
        }
        assert_eq!(seen.len(), ADJECTIVES.len() * NOUNS.len());
    }

    #[test]
    fn suffixed_slugs_add_four_hex() {
        let s = suffixed_slug("swift-crab");
        let suffix = s.strip_prefix("swift-crab-").expect("prefix kept");
        assert_eq!(suffix.len(), 4);
        assert!(suffix.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(validate_slug(&s).is_ok());
    }

    #[test]
    fn slug_validation() {
        assert!(validate_slug("my-feature-2").is_ok());
        assert!(validate_slug(&"a".repeat(41)).is_ok());
        for bad in [
            "",
            "-a",
            "a-",
            "Upper",
            "under_score",
            "sp ace",
            &"a".repeat(42),
        ] {
            let err = validate_slug(bad).expect_err(bad);
            assert!(err.contains("lowercase"), "{err}");
        }
    }

    #[test]
    fn sandbox_names() {
        assert_eq!(
            sandbox_name("swift-crab", "cbx_0123456789ab"),
            "crabbox-swift-crab-01234567"
        );
    }
}
