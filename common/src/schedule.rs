//! Cron schedules in a named timezone (croner + chrono-tz).

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};

/// A parsed, validated schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    cron: Cron,
    tz: Tz,
}

/// Why a schedule was refused, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// The cron pattern does not parse.
    #[error("schedule: `{0}` is not a cron pattern with 5 or 6 fields or an @name ({1})")]
    Cron(String, String),
    /// The timezone is not an IANA name.
    #[error("timezone: `{0}` is not an IANA timezone such as Europe/Berlin or UTC")]
    Timezone(String),
    /// The pattern never fires.
    #[error("schedule: `{0}` never fires")]
    Never(String),
}

impl ScheduleError {
    /// The camelCase field the error is about.
    pub fn field(&self) -> &'static str {
        match self {
            ScheduleError::Cron(..) | ScheduleError::Never(_) => "schedule",
            ScheduleError::Timezone(_) => "timezone",
        }
    }
}

impl Schedule {
    /// Parses a 5- or 6-field pattern (seconds first when 6) or an `@hourly`
    /// style name, in the IANA timezone `tz`.
    pub fn parse(pattern: &str, tz: &str) -> Result<Self, ScheduleError> {
        let tz = Tz::from_str(tz.trim()).map_err(|_| ScheduleError::Timezone(tz.to_owned()))?;
        // croner skips the empty items of a list, so a field of commas alone
        // (`,`) selects nothing and the pattern never fires; finding that out
        // takes croner a search up to the year 5000, seconds of CPU for an
        // empty minute field. Refused here, at once.
        if let Some(field) = pattern
            .split_whitespace()
            .find(|field| field.split(',').all(|item| item.trim().is_empty()))
        {
            return Err(ScheduleError::Cron(
                pattern.to_owned(),
                format!("the field `{field}` selects nothing"),
            ));
        }
        let parser = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build();
        let cron = parser
            .parse(pattern)
            .map_err(|e| ScheduleError::Cron(pattern.to_owned(), e.to_string()))?;
        let s = Self { cron, tz };
        if s.next_after(Utc::now()).is_none() {
            return Err(ScheduleError::Never(pattern.to_owned()));
        }
        Ok(s)
    }

    /// The first fire time strictly after `after`, computed in the
    /// schedule's timezone (so `0 9 * * *` is 09:00 local across DST).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = after.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn accepts_five_six_fields_and_names() {
        assert!(Schedule::parse("*/5 * * * *", "UTC").is_ok());
        assert!(Schedule::parse("30 */5 * * * *", "UTC").is_ok());
        assert!(Schedule::parse("@hourly", "Europe/Berlin").is_ok());
        assert_eq!(
            Schedule::parse("* * *", "UTC").unwrap_err().field(),
            "schedule"
        );
        assert_eq!(
            Schedule::parse("61 * * * *", "UTC").unwrap_err().field(),
            "schedule"
        );
        assert_eq!(
            Schedule::parse("* * * * *", "Mars/Base")
                .unwrap_err()
                .field(),
            "timezone"
        );
    }

    #[test]
    fn a_field_of_commas_alone_is_refused_without_a_search() {
        // Found by common/tests/fuzz.rs: `, * * * *` took croner about 15 s
        // (debug build) to find it never fires. A `Cron` error comes before
        // any search; `Never` only after one.
        for pattern in [
            ", * * * *",
            ",, * * * * *",
            "* , * * *",
            "0 0 , * *",
            "* * * * ,",
        ] {
            assert!(
                matches!(
                    Schedule::parse(pattern, "UTC"),
                    Err(ScheduleError::Cron(..))
                ),
                "{pattern}"
            );
        }
        // Empty items beside others are skipped, as before.
        assert!(Schedule::parse("*/5,, * * * *", "UTC").is_ok());
    }

    #[test]
    fn next_run_keeps_local_time_across_dst() {
        // Europe/Berlin leaves summer time on 2026-10-25 (03:00 CEST -> 02:00 CET).
        let s = Schedule::parse("0 9 * * *", "Europe/Berlin").unwrap();
        // 09:00 CEST = 07:00 UTC before the change ...
        assert_eq!(
            s.next_after(utc("2026-10-24T08:00:00Z")).unwrap(),
            utc("2026-10-25T08:00:00Z")
        );
        // ... and 09:00 CET = 08:00 UTC after it.
        assert_eq!(
            s.next_after(utc("2026-10-24T07:00:00Z")).unwrap(),
            utc("2026-10-25T08:00:00Z")
        );
        assert_eq!(
            s.next_after(utc("2026-10-23T06:00:00Z")).unwrap(),
            utc("2026-10-23T07:00:00Z")
        );
        // Spring forward (2026-03-29 02:00 -> 03:00): a 02:30 job has no 02:30 that day.
        let s = Schedule::parse("30 2 * * *", "Europe/Berlin").unwrap();
        let next = s.next_after(utc("2026-03-28T12:00:00Z")).unwrap();
        assert!(next > utc("2026-03-29T00:00:00Z"), "{next}");
    }
}
