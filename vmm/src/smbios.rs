//! SMBIOS 3.0 tables: who made the machine and which one it is.
//!
//! Guests read the system UUID and serial number from here
//! (`/sys/class/dmi/id/product_uuid`, `product_serial`). A cloud gives each
//! instance its own: EC2-aware software such as cloud-init's EC2 datasource
//! recognises an EC2-compatible cloud by a UUID beginning with `ec2` whose
//! serial number is the same string, and only then uses IMDSv2 tokens.
//!
//! The 64-bit entry point sits at the start of the legacy BIOS segment
//! (0xF0000), where Linux scans for `_SM3_` on non-EFI machines, and the
//! structure table follows it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Where the entry point goes (16-byte aligned, in the scanned segment).
pub const SMBIOS_START: u64 = 0xf0000;
/// The structure table follows the entry point.
const TABLE_OFFSET: u64 = 0x20;
/// Room for the table before the reset vector's page.
const TABLE_MAX: usize = 0x1000;

const MANUFACTURER: &str = "Ferrocloud";
const PRODUCT: &str = "Ferrocloud microVM";
const VERSION: &str = "1";

/// Errors building or writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum SmbiosError {
    /// The UUID is not `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` in hex.
    #[error("invalid system UUID `{0}`: want 8-4-4-4-12 hex digits")]
    Uuid(String),
    /// The tables do not fit their area.
    #[error("SMBIOS tables of {0} bytes do not fit")]
    TooLarge(usize),
    /// Guest memory could not be written.
    #[error("cannot write the SMBIOS tables: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// A parsed system UUID: its canonical text and its 16 bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemUuid {
    text: String,
    bytes: [u8; 16],
}

impl SystemUuid {
    /// Parse `8-4-4-4-12` hex digits (either case; kept in lower case).
    pub fn parse(s: &str) -> Result<Self, SmbiosError> {
        let bad = || SmbiosError::Uuid(s.to_string());
        let groups: Vec<&str> = s.split('-').collect();
        let lens: Vec<usize> = groups.iter().map(|g| g.len()).collect();
        if lens != [8, 4, 4, 4, 12] {
            return Err(bad());
        }
        let hex: String = groups.concat();
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        let mut bytes = [0u8; 16];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Self {
            text: s.to_ascii_lowercase(),
            bytes,
        })
    }

    /// The 16 bytes as SMBIOS 2.6+ stores them: the first three fields
    /// little-endian, the rest as written.
    fn smbios_bytes(&self) -> [u8; 16] {
        let mut b = self.bytes;
        b[0..4].reverse();
        b[4..6].reverse();
        b[6..8].reverse();
        b
    }
}

/// The structure table: type 1 (system information) and type 127 (end).
pub fn table(uuid: Option<&SystemUuid>) -> Vec<u8> {
    let mut strings: Vec<&str> = vec![MANUFACTURER, PRODUCT, VERSION];
    let serial_index = match uuid {
        Some(u) => {
            strings.push(&u.text);
            4
        }
        None => 0,
    };
    let mut t = vec![1u8, 0x1b, 0x00, 0x01, 1, 2, 3, serial_index];
    t.extend_from_slice(&uuid.map_or([0; 16], SystemUuid::smbios_bytes));
    // Wake-up type "power switch", no SKU, no family.
    t.extend_from_slice(&[0x06, 0, 0]);
    for s in &strings {
        t.extend_from_slice(s.as_bytes());
        t.push(0);
    }
    t.push(0);
    t.extend_from_slice(&[127, 4, 0xff, 0xff, 0, 0]);
    t
}

/// The 24-byte SMBIOS 3.0 entry point for a table of `len` bytes at `addr`.
pub fn entry_point(addr: u64, len: u32) -> [u8; 24] {
    let mut e = [0u8; 24];
    e[0..5].copy_from_slice(b"_SM3_");
    e[6] = 24; // entry point length
    e[7] = 3; // SMBIOS 3.0.0
    e[8] = 0;
    e[9] = 0;
    e[10] = 1; // entry point revision
    e[12..16].copy_from_slice(&len.to_le_bytes());
    e[16..24].copy_from_slice(&addr.to_le_bytes());
    let sum = e.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    e[5] = 0u8.wrapping_sub(sum);
    e
}

/// Write the entry point and table into guest memory.
pub fn write(mem: &GuestMemoryMmap, uuid: Option<&SystemUuid>) -> Result<(), SmbiosError> {
    let t = table(uuid);
    if t.len() > TABLE_MAX {
        return Err(SmbiosError::TooLarge(t.len()));
    }
    let addr = SMBIOS_START + TABLE_OFFSET;
    let len = u32::try_from(t.len()).map_err(|_| SmbiosError::TooLarge(t.len()))?;
    mem.write_slice(&entry_point(addr, len), GuestAddress(SMBIOS_START))?;
    mem.write_slice(&t, GuestAddress(addr))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: &str = "EC2F3A10-0D9C-4B7E-8A11-0123456789AB";

    #[test]
    fn uuids_parse_and_refuse_bad_text() {
        let u = SystemUuid::parse(UUID).unwrap();
        assert_eq!(u.text, "ec2f3a10-0d9c-4b7e-8a11-0123456789ab");
        assert_eq!(u.bytes[0], 0xec);
        for bad in [
            "",
            "ec2f3a10",
            "ec2f3a10-0d9c-4b7e-8a11-0123456789a",
            "ec2f3a10-0d9c-4b7e-8a11-0123456789abc",
            "gc2f3a10-0d9c-4b7e-8a11-0123456789ab",
            "ec2f3a100d9c-4b7e-8a11-0123456789ab-",
            "+c2f3a10-0d9c-4b7e-8a11-0123456789ab",
        ] {
            assert!(SystemUuid::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_entry_point_checksums_to_zero_and_points_at_the_table() {
        let e = entry_point(0xf0020, 77);
        assert_eq!(&e[0..5], b"_SM3_");
        assert_eq!(e.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(u32::from_le_bytes(e[12..16].try_into().unwrap()), 77);
        assert_eq!(u64::from_le_bytes(e[16..24].try_into().unwrap()), 0xf0020);
        // Linux reads the version as the big-endian word at 6, low 24 bits.
        let ver = u32::from_be_bytes(e[6..10].try_into().unwrap()) & 0xff_ffff;
        assert_eq!(ver, 0x03_0000);
    }

    /// Decode type 1 the way a guest does: fixed part, then its strings.
    fn system_info(t: &[u8]) -> (Vec<String>, [u8; 16], u8) {
        assert_eq!(t[0], 1);
        let len = t[1] as usize;
        let strings: Vec<String> = t[len..]
            .split(|b| *b == 0)
            .take_while(|s| !s.is_empty())
            .map(|s| String::from_utf8(s.to_vec()).unwrap())
            .collect();
        (strings, t[8..24].try_into().unwrap(), t[7])
    }

    #[test]
    fn type_1_carries_the_uuid_in_smbios_order_and_it_as_serial() {
        let u = SystemUuid::parse(UUID).unwrap();
        let t = table(Some(&u));
        let (strings, uuid, serial) = system_info(&t);
        assert_eq!(
            strings,
            [
                MANUFACTURER,
                PRODUCT,
                VERSION,
                "ec2f3a10-0d9c-4b7e-8a11-0123456789ab"
            ]
        );
        assert_eq!(serial, 4);
        // Linux prints the first three fields little-endian (%pUl).
        assert_eq!(&uuid[0..4], &[0x10, 0x3a, 0x2f, 0xec]);
        assert_eq!(&uuid[4..6], &[0x9c, 0x0d]);
        assert_eq!(&uuid[6..8], &[0x7e, 0x4b]);
        assert_eq!(
            &uuid[8..],
            &[0x8a, 0x11, 0x01, 0x23, 0x45, 0x67, 0x89, 0xab]
        );
        // The table ends with type 127.
        assert_eq!(&t[t.len() - 6..], &[127, 4, 0xff, 0xff, 0, 0]);
    }

    #[test]
    fn without_a_uuid_there_is_no_serial_and_a_zero_uuid() {
        let t = table(None);
        let (strings, uuid, serial) = system_info(&t);
        assert_eq!(strings.len(), 3);
        assert_eq!(serial, 0);
        assert_eq!(uuid, [0; 16]);
    }
}
