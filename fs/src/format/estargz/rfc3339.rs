//! RFC 3339 timestamps as the eStargz TOC writes them: whole seconds, `Z` or
//! `±hh:mm`. A fraction of a second, if present, is dropped (the TOC and the
//! tar header both carry whole seconds).

/// Seconds since the epoch of an RFC 3339 timestamp.
pub fn parse(s: &str) -> Result<i64, String> {
    let bad = |why: &str| format!("bad modtime {s:?}: {why}");
    let b = s.as_bytes();
    if b.len() < 20 {
        return Err(bad("too short"));
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let part = &b[r];
        if !part.iter().all(u8::is_ascii_digit) {
            return Err(bad("expected digits"));
        }
        Ok(part.iter().fold(0i64, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let sep = |i: usize, c: &[u8]| {
        if c.contains(&b[i]) {
            Ok(())
        } else {
            Err(bad("malformed"))
        }
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    sep(4, b"-")?;
    sep(7, b"-")?;
    sep(10, b"Tt ")?;
    let (hour, min, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    sep(13, b":")?;
    sep(16, b":")?;
    let mut i = 19;
    if b[i] == b'.' {
        i += 1;
        let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return Err(bad("empty fraction"));
        }
        i += digits;
    }
    let offset = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if h > 23 || m > 59 {
                return Err(bad("offset out of range"));
            }
            let o = h * 3600 + m * 60;
            if *sign == b'-' { -o } else { o }
        }
        _ => return Err(bad("expected Z or ±hh:mm")),
    };
    // Leap second 60 is allowed by RFC 3339; it folds into the next minute.
    if !(1..=12).contains(&month) || hour > 23 || min > 59 || sec > 60 {
        return Err(bad("field out of range"));
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(bad("day out of range"));
    }
    let days = days_from_civil(year, month, day);
    Ok(days * 86_400 + hour * 3600 + min * 60 + sec - offset)
}

/// `secs` since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (for the writer).
#[cfg(any(test, feature = "writer"))]
pub fn format(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
// algorithm: eras of 400 years starting in March).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(any(test, feature = "writer"))]
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_instants() {
        assert_eq!(parse("1970-01-01T00:00:00Z").unwrap(), 0);
        assert_eq!(parse("2009-02-13T23:31:30Z").unwrap(), 1_234_567_890);
        assert_eq!(parse("2009-02-14T01:31:30+02:00").unwrap(), 1_234_567_890);
        assert_eq!(parse("2009-02-13T18:01:30-05:30").unwrap(), 1_234_567_890);
        assert_eq!(parse("2009-02-13T23:31:30.999Z").unwrap(), 1_234_567_890);
        assert_eq!(parse("1969-12-31T23:59:59Z").unwrap(), -1);
        assert_eq!(parse("2024-02-29T00:00:00Z").unwrap(), 1_709_164_800);
    }

    #[test]
    fn formats_and_round_trips() {
        assert_eq!(format(0), "1970-01-01T00:00:00Z");
        assert_eq!(format(1_234_567_890), "2009-02-13T23:31:30Z");
        for t in [
            -86_401,
            -1,
            0,
            59,
            951_782_400,
            1_709_164_800,
            4_102_444_800,
        ] {
            assert_eq!(parse(&format(t)).unwrap(), t, "{}", format(t));
        }
    }

    #[test]
    fn rejects_malformed_input() {
        for s in [
            "",
            "yesterday",
            "2009-02-13 23:31:30",
            "2009-02-13T23:31:30",
            "2009-13-01T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2009-02-13T24:00:00Z",
            "2009-02-13T23:31:30+2:00",
            "2009-02-13T23:31:30.Z",
            "2009-02-13T23:31:30Zjunk",
        ] {
            assert!(parse(s).is_err(), "{s:?} was accepted");
        }
    }
}
