//! sha256 content digests, the key of everything tarn verifies and caches.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A sha256 digest. tarn verifies and addresses content only by sha256.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

/// A digest string that is not `sha256:` followed by 64 lowercase hex digits.
#[derive(Debug, thiserror::Error)]
#[error("invalid digest {0:?}: want sha256:<64 hex digits>")]
pub struct DigestError(pub String);

impl Digest {
    /// The sha256 of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    /// The 64 lowercase hex digits, without the algorithm prefix.
    pub fn hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from(HEX[usize::from(b >> 4)]));
            s.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        s
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Incremental sha256, for content that arrives in pieces.
#[derive(Default, Clone)]
pub struct Hasher(Sha256);

impl Hasher {
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finish(self) -> Digest {
        Digest(self.0.finalize().into())
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Digest, DigestError> {
        // A TOC holds one or two digests per entry: this is on the path of
        // every layer's opening, so it decodes without a branch per digit.
        let hex = s
            .strip_prefix("sha256:")
            .and_then(|h| <&[u8; 64]>::try_from(h.as_bytes()).ok())
            .ok_or_else(|| DigestError(s.to_string()))?;
        let mut out = [0u8; 32];
        let mut bad = 0u8;
        for (o, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
            let (hi, lo) = (NIBBLE[usize::from(pair[0])], NIBBLE[usize::from(pair[1])]);
            bad |= hi | lo;
            *o = (hi << 4) | (lo & 0xf);
        }
        if bad & NOT_HEX != 0 {
            return Err(DigestError(s.to_string()));
        }
        Ok(Digest(out))
    }
}

/// Marks a byte that is not a lowercase hex digit in [`NIBBLE`].
const NOT_HEX: u8 = 0x10;

/// Each byte's value as a lowercase hex digit, or [`NOT_HEX`].
const NIBBLE: [u8; 256] = {
    let mut t = [NOT_HEX; 256];
    let mut i: u8 = 0;
    while i < 16 {
        t[HEX[i as usize] as usize] = i;
        i += 1;
    }
    t
};

/// As its string form (`sha256:<hex>`), in documents tarn writes.
impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_bad_strings() {
        let d = Digest::of(b"abc");
        assert_eq!(
            d.to_string(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert!("sha256:BA78".parse::<Digest>().is_err());
        assert!("md5:00".parse::<Digest>().is_err());
        let upper = d.to_string().to_uppercase().replace("SHA256", "sha256");
        assert!(upper.parse::<Digest>().is_err());
        // Every position is checked, with any byte that is not a hex digit.
        let good = d.to_string();
        for i in "sha256:".len()..good.len() {
            for bad in ["g", "/", ":", "é"] {
                let mut s = good.clone();
                s.replace_range(i..i + 1, bad);
                assert!(s.parse::<Digest>().is_err(), "{s}");
            }
        }
        assert!(format!("{good}0").parse::<Digest>().is_err());
        assert!(good[..good.len() - 1].parse::<Digest>().is_err());
    }
}
