//! Certificate thumbprints: the SHA-1 or SHA-256 digest of the certificate's DER, as APIM and
//! Windows show them.

use std::fmt;

use sha1::{Digest, Sha1};
use sha2::Sha256;

/// A certificate thumbprint. Displays as upper-case hex without separators (the way APIM and the
/// Windows certificate store show them), so `gateguard thumbprint` output can be pasted as is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Thumbprint {
    Sha1([u8; 20]),
    Sha256([u8; 32]),
}

/// Why a thumbprint in a policy could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThumbprintError {
    /// A character that is neither hex nor a `:`/space separator.
    NotHex,
    /// Hex of a length other than 40 (SHA-1) or 64 (SHA-256).
    WrongLength,
}

impl fmt::Display for ThumbprintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ThumbprintError::NotHex => {
                "not a SHA-1 (40 hex) or SHA-256 (64 hex) thumbprint: contains a non-hex character"
            }
            ThumbprintError::WrongLength => "not a SHA-1 (40 hex) or SHA-256 (64 hex) thumbprint",
        })
    }
}

impl std::error::Error for ThumbprintError {}

impl Thumbprint {
    /// Parses hex of any case; `:` and spaces between digits are ignored (certmgr and openssl
    /// print thumbprints with them).
    pub fn parse(text: &str) -> Result<Thumbprint, ThumbprintError> {
        let digits: String = text
            .chars()
            .filter(|c| *c != ':' && !c.is_whitespace())
            .collect();
        if !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ThumbprintError::NotHex);
        }
        let bytes = crate::hex::decode(&digits).ok_or(ThumbprintError::WrongLength)?;
        if let Ok(sha1) = <[u8; 20]>::try_from(bytes.as_slice()) {
            Ok(Thumbprint::Sha1(sha1))
        } else if let Ok(sha256) = <[u8; 32]>::try_from(bytes.as_slice()) {
            Ok(Thumbprint::Sha256(sha256))
        } else {
            Err(ThumbprintError::WrongLength)
        }
    }

    pub fn sha1_of(der: &[u8]) -> Thumbprint {
        Thumbprint::Sha1(Sha1::digest(der).into())
    }

    pub fn sha256_of(der: &[u8]) -> Thumbprint {
        Thumbprint::Sha256(Sha256::digest(der).into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Thumbprint::Sha1(b) => b,
            Thumbprint::Sha256(b) => b,
        }
    }

    /// Lower-case hex, the form Envoy uses (`connection.sha256_peer_certificate_digest`, XFCC
    /// `Hash=`) and the one stats and logs use.
    pub fn to_lower_hex(&self) -> String {
        crate::hex::encode(self.as_bytes())
    }
}

impl fmt::Display for Thumbprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.as_bytes() {
            write!(f, "{b:02X}")?;
        }
        Ok(())
    }
}
