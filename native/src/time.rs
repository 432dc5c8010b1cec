//! occurred_at: RFC 3339 as producers write it (what producer/compiled.py's pattern took), in
//! UTC, and its `isoformat()` text. Other forms are the reference decoder's.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    pub year: i32,
    pub month: u8,
    pub day: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
    pub microsecond: u32,
}

fn digits(text: &[u8]) -> Option<u32> {
    text.iter().try_fold(0u32, |value, &byte| {
        byte.is_ascii_digit()
            .then(|| value * 10 + u32::from(byte - b'0'))
    })
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm), and back.
pub fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146097 + day_of_era - 719468
}

fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let days = days + 719468;
    let era = days.div_euclid(146097);
    let day_of_era = days - era * 146097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36524 - day_of_era / 146096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    (year_of_era + era * 400 + i64::from(month <= 2), month, day)
}

impl Timestamp {
    /// `YYYY-MM-DDTHH:MM:SS[.f{1,6}](Z|±HH:MM)` with ASCII digits, a valid date and time, in
    /// UTC within years 1..=9999 and not at either end of that range (the reference decoder
    /// rejects those).
    pub fn parse(text: &str) -> Option<Timestamp> {
        let bytes = text.as_bytes();
        if bytes.len() < 20
            || bytes[4] != b'-'
            || bytes[7] != b'-'
            || bytes[10] != b'T'
            || bytes[13] != b':'
            || bytes[16] != b':'
        {
            return None;
        }
        let year = i64::from(digits(&bytes[0..4])?);
        let month = i64::from(digits(&bytes[5..7])?);
        let day = i64::from(digits(&bytes[8..10])?);
        let hour = i64::from(digits(&bytes[11..13])?);
        let minute = i64::from(digits(&bytes[14..16])?);
        let second = i64::from(digits(&bytes[17..19])?);
        let mut at = 19;
        let mut microsecond = 0i64;
        if bytes[at] == b'.' {
            let start = at + 1;
            let mut end = start;
            while end < bytes.len() && bytes[end].is_ascii_digit() {
                end += 1;
            }
            let count = end - start;
            if !(1..=6).contains(&count) {
                return None;
            }
            microsecond = i64::from(digits(&bytes[start..end])?) * 10i64.pow((6 - count) as u32);
            at = end;
        }
        let offset_minutes = match &bytes[at..] {
            b"Z" => 0,
            [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
                let hours = i64::from(digits(&[*h1, *h2])?);
                let minutes = i64::from(digits(&[*m1, *m2])?);
                if hours > 23 || minutes > 59 {
                    return None;
                }
                let offset = hours * 60 + minutes;
                if *sign == b'-' {
                    -offset
                } else {
                    offset
                }
            }
            _ => return None,
        };
        if year < 1
            || !(1..=12).contains(&month)
            || day < 1
            || day > days_in_month(year, month)
            || hour > 23
            || minute > 59
            || second > 59
        {
            return None;
        }
        let minutes =
            days_from_civil(year, month, day) * 1440 + hour * 60 + minute - offset_minutes;
        let (year, month, day) = civil_from_days(minutes.div_euclid(1440));
        let minute_of_day = minutes.rem_euclid(1440);
        if !(1..=9999).contains(&year) {
            return None; // astimezone() overflows
        }
        let utc = Timestamp {
            year: year as i32,
            month: month as u8,
            day: day as u8,
            hour: (minute_of_day / 60) as u8,
            minute: (minute_of_day % 60) as u8,
            second: second as u8,
            microsecond: microsecond as u32,
        };
        let first = Timestamp {
            year: 1,
            month: 1,
            day: 1,
            hour: 0,
            minute: 0,
            second: 0,
            microsecond: 0,
        };
        let last = Timestamp {
            year: 9999,
            month: 12,
            day: 31,
            hour: 23,
            minute: 59,
            second: 59,
            microsecond: 999_999,
        };
        (utc != first && utc != last).then_some(utc)
    }

    /// What `datetime.isoformat()` writes for this time in UTC.
    pub fn isoformat(&self) -> String {
        let mut text = Vec::with_capacity(32);
        let two = |text: &mut Vec<u8>, separator: u8, value: u32| {
            text.push(separator);
            text.extend_from_slice(&[b'0' + (value / 10) as u8, b'0' + (value % 10) as u8]);
        };
        let year = self.year as u32;
        text.extend_from_slice(&[
            b'0' + (year / 1000) as u8,
            b'0' + (year / 100 % 10) as u8,
            b'0' + (year / 10 % 10) as u8,
            b'0' + (year % 10) as u8,
        ]);
        two(&mut text, b'-', self.month.into());
        two(&mut text, b'-', self.day.into());
        two(&mut text, b'T', self.hour.into());
        two(&mut text, b':', self.minute.into());
        two(&mut text, b':', self.second.into());
        if self.microsecond != 0 {
            text.push(b'.');
            let mut rest = self.microsecond;
            let mut digits = [b'0'; 6];
            for digit in digits.iter_mut().rev() {
                *digit = b'0' + (rest % 10) as u8;
                rest /= 10;
            }
            text.extend_from_slice(&digits);
        }
        text.extend_from_slice(b"+00:00");
        String::from_utf8(text).expect("ASCII")
    }
}
