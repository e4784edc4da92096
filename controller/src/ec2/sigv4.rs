//! AWS Signature Version 4, the verifier side (sans-IO).
//!
//! [`parse_authorization`] reads the `Authorization` header's credential
//! scope, signed headers and signature; [`verify`] rebuilds the canonical
//! request from what was received and compares signatures in constant
//! time. The caller looks up the secret of the access key id the header
//! names and checks the scope against its region and service.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// The only algorithm EC2 accepts here.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// Why a request's signature is refused; each maps to an EC2 error code.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SigError {
    /// No `Authorization` header (or presigned query) at all.
    #[error("the request carries no AWS Signature Version 4 authorization")]
    Missing,
    /// The header cannot be parsed.
    #[error("malformed Authorization header: {0}")]
    Malformed(String),
    /// Signed with something other than AWS4-HMAC-SHA256.
    #[error("unsupported signing algorithm {0:?} (want AWS4-HMAC-SHA256)")]
    Algorithm(String),
    /// The credential's scope is not this endpoint's.
    #[error("credential scope {0:?} is wrong: {1}")]
    Scope(String, String),
    /// `X-Amz-Date` missing or malformed.
    #[error("X-Amz-Date is missing or not YYYYMMDDTHHMMSSZ")]
    Date,
    /// More than 15 minutes from the server's clock.
    #[error("request time {0} is more than 15 minutes from the server's time {1}")]
    Expired(String, String),
    /// A header listed as signed is absent.
    #[error("signed header {0:?} is not in the request")]
    SignedHeaderMissing(String),
    /// The signature does not match.
    #[error("the request signature does not match the one calculated with the key's secret")]
    Mismatch,
}

/// What the `Authorization` header says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authorization {
    /// The access key id.
    pub access_key: String,
    /// `YYYYMMDD` of the scope.
    pub date: String,
    /// Region of the scope.
    pub region: String,
    /// Service of the scope.
    pub service: String,
    /// Lower-case header names, in the order given.
    pub signed_headers: Vec<String>,
    /// Hex signature.
    pub signature: String,
}

/// Parse `AWS4-HMAC-SHA256 Credential=AK/DATE/REGION/SERVICE/aws4_request,
/// SignedHeaders=a;b, Signature=hex`.
pub fn parse_authorization(header: &str) -> Result<Authorization, SigError> {
    let (alg, rest) = header
        .trim()
        .split_once(' ')
        .ok_or_else(|| SigError::Malformed("no algorithm".into()))?;
    if alg != ALGORITHM {
        return Err(SigError::Algorithm(alg.to_string()));
    }
    let (mut cred, mut signed, mut sig) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| SigError::Malformed(format!("`{}` is not key=value", part.trim())))?;
        match k {
            "Credential" => cred = Some(v),
            "SignedHeaders" => signed = Some(v),
            "Signature" => sig = Some(v),
            _ => return Err(SigError::Malformed(format!("unknown field {k}"))),
        }
    }
    let cred = cred.ok_or_else(|| SigError::Malformed("no Credential".into()))?;
    let parts: Vec<&str> = cred.split('/').collect();
    let [access_key, date, region, service, term] = parts[..] else {
        return Err(SigError::Malformed(format!(
            "Credential {cred:?} is not KEY/DATE/REGION/SERVICE/aws4_request"
        )));
    };
    if term != "aws4_request" || access_key.is_empty() {
        return Err(SigError::Malformed(format!(
            "Credential {cred:?} is not KEY/DATE/REGION/SERVICE/aws4_request"
        )));
    }
    let signed_headers: Vec<String> = signed
        .ok_or_else(|| SigError::Malformed("no SignedHeaders".into()))?
        .split(';')
        .map(str::to_ascii_lowercase)
        .collect();
    if !signed_headers.iter().any(|h| h == "host") {
        return Err(SigError::Malformed(
            "SignedHeaders must include host".into(),
        ));
    }
    let signature = sig
        .filter(|s| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| SigError::Malformed("Signature is not 64 hex digits".into()))?;
    Ok(Authorization {
        access_key: access_key.to_string(),
        date: date.to_string(),
        region: region.to_string(),
        service: service.to_string(),
        signed_headers,
        signature: signature.to_ascii_lowercase(),
    })
}

/// A received request, as the signature covers it.
pub struct Received<'a> {
    /// `GET`, `POST`.
    pub method: &'a str,
    /// The path as received (still percent-encoded).
    pub path: &'a str,
    /// The raw query string (without `?`), possibly empty.
    pub query: &'a str,
    /// Every header (name in any case, value as received).
    pub headers: &'a [(String, String)],
    /// The body.
    pub body: &'a [u8],
}

impl Received<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Seconds since the epoch of an `X-Amz-Date` (`YYYYMMDDTHHMMSSZ`).
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hh, mm, ss) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || hh > 23 || mm > 59 || ss > 60 {
        return None;
    }
    Some(days_from_civil(y, m, d) * 86_400 + hh * 3600 + mm * 60 + ss)
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// RFC 3986 encoding as SigV4 wants it: unreserved characters as they
/// are, everything else `%XX` (upper case).
pub fn uri_encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-decoding (`+` stays `+`: SigV4 canonical queries are not form
/// encoded).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && b[i + 1].is_ascii_hexdigit()
            && b[i + 2].is_ascii_hexdigit()
        {
            let v = u8::from_str_radix(&s[i + 1..i + 3], 16).expect("two hex digits");
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The canonical query string: each name and value decoded, then encoded
/// the SigV4 way, sorted.
pub fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (uri_encode(&decode(k), false), uri_encode(&decode(v), false))
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    m.update(data);
    m.finalize().into_bytes().to_vec()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The signature of `req` with `secret` under `auth`'s scope (the header's
/// own signature is not used), with `amz_date` the request's time stamp.
pub fn signature(
    req: &Received<'_>,
    auth: &Authorization,
    amz_date: &str,
    secret: &str,
) -> Result<String, SigError> {
    let mut canonical_headers = String::new();
    for name in &auth.signed_headers {
        let values: Vec<String> = req
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        if values.is_empty() {
            return Err(SigError::SignedHeaderMissing(name.clone()));
        }
        canonical_headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    let payload = match req.header("x-amz-content-sha256") {
        Some(h) if h != "UNSIGNED-PAYLOAD" => h.to_ascii_lowercase(),
        _ => hex(&Sha256::digest(req.body)),
    };
    let path = if req.path.is_empty() { "/" } else { req.path };
    let canonical = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        uri_encode(&decode(path), true),
        canonical_query(req.query),
        canonical_headers,
        auth.signed_headers.join(";"),
        payload
    );
    let scope = format!(
        "{}/{}/{}/aws4_request",
        auth.date, auth.region, auth.service
    );
    let to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical.as_bytes()))
    );
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), auth.date.as_bytes());
    let k_region = hmac(&k_date, auth.region.as_bytes());
    let k_service = hmac(&k_region, auth.service.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    Ok(hex(&hmac(&k_signing, to_sign.as_bytes())))
}

/// Check `req`, signed under `auth` with `secret`, at `now` (Unix seconds):
/// the scope's date matches the request's, the request is at most 15
/// minutes off, and the signature matches.
pub fn verify(
    req: &Received<'_>,
    auth: &Authorization,
    secret: &str,
    now: i64,
) -> Result<(), SigError> {
    let amz_date = req.header("x-amz-date").ok_or(SigError::Date)?;
    let t = parse_amz_date(amz_date).ok_or(SigError::Date)?;
    if !amz_date.starts_with(&auth.date) {
        return Err(SigError::Scope(
            format!("{}/{}/{}", auth.date, auth.region, auth.service),
            format!("its date is not the request's ({amz_date})"),
        ));
    }
    if (now - t).abs() > 15 * 60 {
        return Err(SigError::Expired(
            amz_date.to_string(),
            format_amz_date(now),
        ));
    }
    let want = signature(req, auth, amz_date, secret)?;
    // Constant time.
    let same = want.len() == auth.signature.len()
        && want
            .bytes()
            .zip(auth.signature.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(SigError::Mismatch)
    }
}

/// The headers of a form POST to `host` signed by `access_key`/`secret`
/// for `region`'s `ec2` at Unix time `now`: `host`, `content-type`,
/// `x-amz-date` and `authorization` (for clients without an AWS SDK: the
/// benchmarks and tests).
pub fn sign_post(
    host: &str,
    body: &[u8],
    access_key: &str,
    secret: &str,
    region: &str,
    now: i64,
) -> Vec<(String, String)> {
    let amz_date = format_amz_date(now);
    let mut headers = vec![
        ("host".to_string(), host.to_string()),
        (
            "content-type".to_string(),
            "application/x-www-form-urlencoded; charset=utf-8".to_string(),
        ),
        ("x-amz-date".to_string(), amz_date.clone()),
    ];
    let auth = Authorization {
        access_key: access_key.to_string(),
        date: amz_date[..8].to_string(),
        region: region.to_string(),
        service: "ec2".to_string(),
        signed_headers: vec!["content-type".into(), "host".into(), "x-amz-date".into()],
        signature: String::new(),
    };
    let req = Received {
        method: "POST",
        path: "/",
        query: "",
        headers: &headers,
        body,
    };
    let sig = signature(&req, &auth, &amz_date, secret).expect("every signed header is there");
    headers.push((
        "authorization".to_string(),
        format!(
            "{ALGORITHM} Credential={access_key}/{}/{region}/ec2/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, Signature={sig}",
            auth.date
        ),
    ));
    headers
}

/// `YYYYMMDDTHHMMSSZ` of Unix seconds `t`.
pub fn format_amz_date(t: i64) -> String {
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// ISO 8601 (`2026-12-07T04:26:43.000Z`) of Unix milliseconds, as EC2
/// writes times.
pub fn iso8601_ms(ms: u64) -> String {
    let t = (ms / 1000) as i64;
    let (days, secs) = (t.div_euclid(86_400), t.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ms % 1000
    )
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    fn vanilla() -> (Vec<(String, String)>, Authorization) {
        let headers = vec![
            ("Host".to_string(), "example.amazonaws.com".to_string()),
            ("X-Amz-Date".to_string(), "20150830T123600Z".to_string()),
        ];
        let auth = parse_authorization(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        )
        .unwrap();
        (headers, auth)
    }

    /// AWS's published "get-vanilla" example of the SigV4 test suite.
    #[test]
    fn the_aws_vanilla_example_verifies() {
        let (headers, auth) = vanilla();
        assert_eq!(auth.access_key, "AKIDEXAMPLE");
        let req = Received {
            method: "GET",
            path: "/",
            query: "",
            headers: &headers,
            body: b"",
        };
        let now = parse_amz_date("20150830T123600Z").unwrap();
        verify(&req, &auth, SECRET, now).unwrap();
        assert_eq!(verify(&req, &auth, "wrong", now), Err(SigError::Mismatch));
        assert!(matches!(
            verify(&req, &auth, SECRET, now + 16 * 60),
            Err(SigError::Expired(..))
        ));
        // A changed request no longer matches.
        let req = Received {
            method: "POST",
            ..req
        };
        assert_eq!(verify(&req, &auth, SECRET, now), Err(SigError::Mismatch));
    }

    #[test]
    fn bad_headers_are_named() {
        assert_eq!(
            parse_authorization(""),
            Err(SigError::Malformed("no algorithm".into()))
        );
        assert!(matches!(
            parse_authorization("AWS4-HMAC-SHA1 Credential=a/b/c/d/aws4_request"),
            Err(SigError::Algorithm(_))
        ));
        let e = parse_authorization(
            "AWS4-HMAC-SHA256 Credential=AK/20150830/us-east-1/ec2, SignedHeaders=host, Signature=00",
        )
        .unwrap_err();
        assert!(e.to_string().contains("KEY/DATE/REGION/SERVICE"), "{e}");
        let e = parse_authorization(
            "AWS4-HMAC-SHA256 Credential=AK/20150830/r/ec2/aws4_request, SignedHeaders=x-amz-date, Signature=00",
        )
        .unwrap_err();
        assert!(e.to_string().contains("host"), "{e}");
        let (headers, mut auth) = vanilla();
        auth.signed_headers.push("content-type".into());
        let req = Received {
            method: "GET",
            path: "/",
            query: "",
            headers: &headers,
            body: b"",
        };
        let now = parse_amz_date("20150830T123600Z").unwrap();
        assert_eq!(
            verify(&req, &auth, SECRET, now),
            Err(SigError::SignedHeaderMissing("content-type".into()))
        );
    }

    #[test]
    fn a_signed_post_verifies_and_a_changed_body_does_not() {
        let now = 1_800_000_000;
        let body = b"Action=DescribeInstances&Version=2016-11-15";
        let headers = sign_post("127.0.0.1:8788", body, "ak-1", "s3cret", "local", now);
        let auth_header = &headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .unwrap()
            .1;
        let auth = parse_authorization(auth_header).unwrap();
        let req = |body: &'static [u8]| Received {
            method: "POST",
            path: "/",
            query: "",
            headers: &headers,
            body,
        };
        verify(&req(body), &auth, "s3cret", now).unwrap();
        assert_eq!(
            verify(&req(b"Action=TerminateInstances"), &auth, "s3cret", now),
            Err(SigError::Mismatch)
        );
    }

    #[test]
    fn dates_and_encodings() {
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(0));
        assert_eq!(format_amz_date(1_440_938_160), "20150830T123600Z");
        assert_eq!(parse_amz_date("20150830T123600Z"), Some(1_440_938_160));
        assert_eq!(parse_amz_date("2015-08-30T12:36:00Z"), None);
        assert_eq!(iso8601_ms(1_440_938_160_123), "2015-08-30T12:36:00.123Z");
        assert_eq!(uri_encode("a b/c~", false), "a%20b%2Fc~");
        assert_eq!(canonical_query("b=2&a=x%20y&a=1"), "a=1&a=x%20y&b=2");
    }
}
