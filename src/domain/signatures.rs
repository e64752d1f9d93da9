//! Providers' signatures herald checks with public keys: RSA PKCS#1 v1.5 under an X.509
//! certificate's key (Amazon SNS) and ECDSA P-256 (SendGrid's event webhook).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use ring::signature::{self, UnparsedPublicKey};
use sha2::Sha256;
use x509_parser::prelude::{FromDer as _, SubjectPublicKeyInfo};

/// The uncompressed P-256 point of a base64 DER `SubjectPublicKeyInfo` (the form SendGrid
/// shows its verification key in).
pub fn p256_public_key(base64_der: &str) -> Result<Vec<u8>, String> {
    let der = STANDARD
        .decode(base64_der.trim())
        .map_err(|_| "is not base64".to_owned())?;
    let (rest, spki) = SubjectPublicKeyInfo::from_der(&der)
        .map_err(|_| "is not a DER public key (SubjectPublicKeyInfo)".to_owned())?;
    let point = spki.subject_public_key.data.to_vec();
    // id-ecPublicKey; the curve is checked by ring when it verifies.
    if !rest.is_empty()
        || spki.algorithm.algorithm.to_id_string() != "1.2.840.10045.2.1"
        || point.len() != 65
    {
        return Err("is not an ECDSA P-256 public key".to_owned());
    }
    Ok(point)
}

/// Whether `der_signature` (ASN.1 DER) is P-256/SHA-256 ECDSA of `message` under `point`.
pub fn p256_verifies(point: &[u8], message: &[u8], der_signature: &[u8]) -> bool {
    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, point)
        .verify(message, der_signature)
        .is_ok()
}

/// The RSA public key (PKCS#1 DER) of a PEM certificate valid now.
pub fn certificate_rsa_key(pem: &[u8]) -> Result<Vec<u8>, String> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).map_err(|_| "not a PEM certificate")?;
    let cert = pem.parse_x509().map_err(|_| "not an X.509 certificate")?;
    if !cert.validity().is_valid() {
        return Err("the certificate is expired or not yet valid".to_owned());
    }
    let spki = cert.public_key();
    // rsaEncryption
    if spki.algorithm.algorithm.to_id_string() != "1.2.840.113549.1.1.1" {
        return Err("the certificate's key is not RSA".to_owned());
    }
    Ok(spki.subject_public_key.data.to_vec())
}

/// The digest an RSA PKCS#1 v1.5 signature was made over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RsaDigest {
    Sha1,
    Sha256,
}

/// Whether `sig` is an RSA PKCS#1 v1.5 signature of `message` under `key` (PKCS#1 DER).
pub fn rsa_verifies(key: &[u8], digest: RsaDigest, message: &[u8], sig: &[u8]) -> bool {
    let algorithm = match digest {
        RsaDigest::Sha1 => &signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
        RsaDigest::Sha256 => &signature::RSA_PKCS1_2048_8192_SHA256,
    };
    UnparsedPublicKey::new(algorithm, key)
        .verify(message, sig)
        .is_ok()
}

fn hmac_of(key: &[u8], parts: &[&[u8]]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    for p in parts {
        mac.update(p);
    }
    mac
}

/// HMAC-SHA256 of the concatenated `parts` under `key`: the one MAC herald signs with
/// (unsubscribe links, inbox user hashes and session keys, webhook signatures).
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    hmac_of(key, parts).finalize().into_bytes().into()
}

/// True when `tag` is the HMAC-SHA256 of `parts` under `key` (compared in constant time).
pub fn hmac_sha256_verifies(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    hmac_of(key, parts).verify_slice(tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_p256_key_is_read_from_its_base64_der_and_nothing_else_is() {
        // SendGrid's documented sample verification key.
        let key = "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEEDr2LjtURuePQzplybdC+u4CwrqDqBaWjcMMsTbhdbcwHBcepxo7yAQGhHPTnlvFYPAZFceEu/1FwCM/QmGUhA==";
        assert_eq!(p256_public_key(key).map(|p| p.len()), Ok(65));
        for bad in ["", "not base64!", "AAAA", &key[..40]] {
            assert!(p256_public_key(bad).is_err(), "{bad}");
        }
    }
}
