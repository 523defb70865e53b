//! CRC32C (Castagnoli) as overlaybd computes it: the raw register, started
//! at a seed and never inverted, so `crc32c(seed, bytes)` equals the
//! reference tools' `crc32c_extend(bytes, len, seed)`. ZFile uses seed 0
//! for its header digest and block-length index, and [`BLOCK_SEED`] for the
//! checksum after each compressed block.
//!
//! A table-driven software CRC, eight bytes a step: a block is 4-64 KiB and
//! is decompressed right after, so the CRC is never the slow half; a crate
//! (and its CPU-feature detection) is not worth it here.

/// The seed of the CRC32C that follows each compressed block.
pub const BLOCK_SEED: u32 = 100_007;

/// The Castagnoli polynomial, bit-reflected.
const POLY: u32 = 0x82F6_3B78;

/// `TABLES[k][b]`: the CRC of byte `b` followed by `k` zero bytes.
const TABLES: [[u32; 256]; 8] = tables();

const fn tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut b: u32 = 0;
    while b < 256 {
        let mut c = b;
        let mut bit = 0;
        while bit < 8 {
            c = if c & 1 == 1 { (c >> 1) ^ POLY } else { c >> 1 };
            bit += 1;
        }
        t[0][b as usize] = c;
        b += 1;
    }
    let mut k = 1;
    while k < 8 {
        let mut b = 0;
        while b < 256 {
            let prev = t[k - 1][b];
            t[k][b] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            b += 1;
        }
        k += 1;
    }
    t
}

/// The raw CRC32C register after `bytes`, started at `seed`.
pub fn crc32c(seed: u32, bytes: &[u8]) -> u32 {
    let mut crc = seed;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        let lo = crc ^ u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
        crc = TABLES[7][usize::from(lo.to_le_bytes()[0])]
            ^ TABLES[6][usize::from(lo.to_le_bytes()[1])]
            ^ TABLES[5][usize::from(lo.to_le_bytes()[2])]
            ^ TABLES[4][usize::from(lo.to_le_bytes()[3])]
            ^ TABLES[3][usize::from(w[4])]
            ^ TABLES[2][usize::from(w[5])]
            ^ TABLES[1][usize::from(w[6])]
            ^ TABLES[0][usize::from(w[7])];
    }
    for &b in words.remainder() {
        crc = (crc >> 8) ^ TABLES[0][usize::from(crc.to_le_bytes()[0] ^ b)];
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::crc32c;

    #[test]
    fn matches_the_standard_check_value_once_inverted() {
        // The standard CRC-32C of "123456789" is 0xE3069283: the raw
        // register started at !0 and inverted at the end.
        assert_eq!(!crc32c(!0, b"123456789"), 0xE306_9283);
    }

    #[test]
    fn eight_bytes_a_step_equals_one_byte_a_step() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3).to_le_bytes()[0]).collect();
        let bytewise = data.iter().fold(100_007u32, |crc, &b| {
            let mut c = crc ^ u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            c
        });
        assert_eq!(crc32c(100_007, &data), bytewise);
        // Split anywhere, the register carries over.
        let (a, b) = data.split_at(333);
        assert_eq!(crc32c(crc32c(100_007, a), b), bytewise);
    }
}
