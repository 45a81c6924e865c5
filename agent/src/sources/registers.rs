//! Modbus register maps: where each feature's value sits on a PLC, how its words decode into a
//! number, and how a whole map is read in as few requests as the protocol allows. Pure: the
//! Modbus adapter (`sources/modbus.rs`) makes the requests and hands their answers here.
//!
//! Words are big-endian on the wire (the Modbus convention). A value wider than one register
//! takes its words most significant first (`word_order = "big"`, "ABCD") or least significant
//! first (`"little"`, "CDAB", common on PLCs); `byte_order = "little"` swaps the two bytes of
//! every word ("BADC"/"DCBA"). The decoded number is `raw * scale + offset`, as f32.

use crate::reading::{Fault, Sample};
use serde::Deserialize;

/// The four Modbus data tables. Requests go out in this order, so a reading's holding
/// registers are read first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Table {
    /// Holding registers (function 3).
    Holding,
    /// Input registers (function 4).
    Input,
    /// Coils (function 1).
    Coil,
    /// Discrete inputs (function 2).
    Discrete,
}

impl Table {
    fn is_bits(self) -> bool {
        matches!(self, Table::Coil | Table::Discrete)
    }

    /// The most a single read may ask for (the Modbus specification's limits).
    fn max_count(self) -> u16 {
        if self.is_bits() { 2000 } else { 125 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    U16,
    I16,
    U32,
    I32,
    F32,
    F64,
    /// A coil or discrete input, a register read as "not zero", or one bit of a register
    /// ([`Register::bit`]): 1.0 or 0.0.
    Bool,
}

impl ValueType {
    /// Registers (or bits) the value spans.
    fn width(self) -> u16 {
        match self {
            ValueType::U16 | ValueType::I16 | ValueType::Bool => 1,
            ValueType::U32 | ValueType::I32 | ValueType::F32 => 2,
            ValueType::F64 => 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    #[default]
    Big,
    Little,
}

/// Where one feature's value is and how it decodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Register {
    pub table: Table,
    pub address: u16,
    pub value_type: ValueType,
    pub word_order: Order,
    pub byte_order: Order,
    pub scale: f64,
    pub offset: f64,
    /// For a bool in a register: the bit (0 the least significant) that holds it, as PLCs
    /// pack status bits into one word.
    pub bit: Option<u8>,
}

impl Register {
    /// Why this register cannot be read as configured, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if self.table.is_bits() && self.value_type != ValueType::Bool {
            return Err(format!("a {:?} table holds bits: its type must be bool", self.table));
        }
        if u32::from(self.address) + u32::from(self.value_type.width()) > 65536 {
            return Err(format!(
                "address {} is too high for a {:?}",
                self.address, self.value_type
            ));
        }
        if let Some(bit) = self.bit
            && (self.value_type != ValueType::Bool || self.table.is_bits() || bit > 15)
        {
            return Err(format!("bit {bit}: a bit is 0 to 15 of a register read as bool"));
        }
        if !self.scale.is_finite() || self.scale == 0.0 || !self.offset.is_finite() {
            return Err("scale must be a finite number other than 0, offset a finite number".into());
        }
        Ok(())
    }

    fn end(&self) -> u32 {
        u32::from(self.address) + u32::from(self.value_type.width())
    }

    /// The value of `words` (this register's, as read).
    fn decode(&self, words: &[u16]) -> Sample {
        let swap = |w: u16| if self.byte_order == Order::Little { w.swap_bytes() } else { w };
        let mut raw: u64 = 0;
        let mut push = |w: u16| raw = (raw << 16) | u64::from(swap(w));
        match self.word_order {
            Order::Big => words.iter().copied().for_each(&mut push),
            Order::Little => words.iter().rev().copied().for_each(&mut push),
        }
        let x = match self.value_type {
            ValueType::U16 => f64::from(raw as u16),
            ValueType::I16 => f64::from(raw as u16 as i16),
            ValueType::U32 => f64::from(raw as u32),
            ValueType::I32 => f64::from(raw as u32 as i32),
            ValueType::F32 => f64::from(f32::from_bits(raw as u32)),
            ValueType::F64 => f64::from_bits(raw),
            ValueType::Bool => match self.bit {
                Some(bit) => f64::from(u8::from(raw >> bit & 1 == 1)),
                None => f64::from(u8::from(raw != 0)),
            },
        };
        let value = (x * self.scale + self.offset) as f32;
        if value.is_finite() { Sample::Value(value) } else { Sample::NonFinite }
    }
}

/// One read: `count` registers (or bits) of `table` from `address`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub table: Table,
    pub address: u16,
    pub count: u16,
}

/// What a request brought back.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    Words(Vec<u16>),
    Bits(Vec<bool>),
    Failed(Fault),
}

/// A register map resolved into requests: per feature, which request holds it and where.
#[derive(Debug, Clone, PartialEq)]
pub struct Map {
    requests: Vec<Request>,
    /// Per feature: its register, the request it is in and its offset there.
    slots: Vec<Option<(Register, usize, usize)>>,
}

impl Map {
    /// `registers` holds one entry per feature, in the order readings list them (`None`: the
    /// feature has no register and is always missing). Registers of one table that touch or
    /// overlap share a request, up to the protocol's limit per request.
    pub fn new(registers: Vec<Option<Register>>) -> Map {
        let mut spans: Vec<Register> = registers.iter().flatten().copied().collect();
        spans.sort_by_key(|r| (r.table, r.address));
        let mut requests: Vec<Request> = Vec::new();
        for r in spans {
            if let Some(last) = requests.last_mut()
                && last.table == r.table
                && u32::from(r.address) <= u32::from(last.address) + u32::from(last.count)
                && r.end() - u32::from(last.address) <= u32::from(r.table.max_count())
            {
                let end = (u32::from(last.address) + u32::from(last.count)).max(r.end());
                last.count = (end - u32::from(last.address)) as u16;
                continue;
            }
            requests.push(Request {
                table: r.table,
                address: r.address,
                count: r.value_type.width(),
            });
        }
        let slots = registers
            .into_iter()
            .map(|r| {
                let r = r?;
                requests
                    .iter()
                    .position(|q| {
                        q.table == r.table
                            && q.address <= r.address
                            && r.end() <= u32::from(q.address) + u32::from(q.count)
                    })
                    .map(|i| (r, i, usize::from(r.address - requests[i].address)))
            })
            .collect();
        Map { requests, slots }
    }

    pub fn requests(&self) -> &[Request] {
        &self.requests
    }

    /// One sample per feature from the answers to [`Map::requests`], in that order. A feature
    /// whose request failed carries the failure; one the answer is too short for is a bad
    /// response.
    pub fn reading(&self, answers: &[Answer]) -> Vec<Sample> {
        self.slots
            .iter()
            .map(|slot| {
                let Some((register, request, at)) = slot else { return Sample::Missing };
                let width = usize::from(register.value_type.width());
                match answers.get(*request) {
                    Some(Answer::Words(words)) => match words.get(*at..*at + width) {
                        Some(words) => register.decode(words),
                        None => Sample::Unavailable(Fault::BadResponse),
                    },
                    Some(Answer::Bits(bits)) => match bits.get(*at) {
                        Some(bit) => register.decode(&[u16::from(*bit)]),
                        None => Sample::Unavailable(Fault::BadResponse),
                    },
                    Some(Answer::Failed(fault)) => Sample::Unavailable(*fault),
                    None => Sample::Unavailable(Fault::BadResponse),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(table: Table, address: u16, value_type: ValueType) -> Register {
        Register {
            table,
            address,
            value_type,
            word_order: Order::Big,
            byte_order: Order::Big,
            scale: 1.0,
            offset: 0.0,
            bit: None,
        }
    }

    fn words_of_f32(x: f32) -> [u16; 2] {
        let b = x.to_bits();
        [(b >> 16) as u16, b as u16]
    }

    #[test]
    fn touching_registers_of_a_table_share_one_request_and_gaps_or_tables_split_them() {
        use Table::*;
        use ValueType::*;
        let map = Map::new(vec![
            Some(reg(Holding, 2, F32)),
            Some(reg(Holding, 0, F32)),
            Some(reg(Holding, 4, U16)),
            Some(reg(Holding, 10, I16)),
            None,
            Some(reg(Input, 4, F64)),
            Some(reg(Input, 0, U32)),
            Some(reg(Coil, 7, Bool)),
            Some(reg(Holding, 3, U16)), // overlaps the first: read once
        ]);
        let q = |table, address, count| Request { table, address, count };
        assert_eq!(
            map.requests(),
            &[q(Holding, 0, 5), q(Holding, 10, 1), q(Input, 0, 2), q(Input, 4, 4), q(Coil, 7, 1)]
        );
    }

    #[test]
    fn a_request_never_asks_for_more_than_the_protocol_allows() {
        let registers = (0..100).map(|i| Some(reg(Table::Input, i * 2, ValueType::F32))).collect();
        let map = Map::new(registers);
        let counts: Vec<u16> = map.requests().iter().map(|r| r.count).collect();
        assert_eq!(counts, vec![124, 76]);
        assert_eq!(map.requests()[1].address, 124);
    }

    #[test]
    fn each_type_and_order_decodes_to_its_value() {
        let one = |r: Register, words: Vec<u16>| {
            Map::new(vec![Some(r)]).reading(&[Answer::Words(words)])[0]
        };
        let f = words_of_f32(642.15);
        assert_eq!(one(reg(Table::Holding, 0, ValueType::F32), f.to_vec()), Sample::Value(642.15));
        let cdab = Register { word_order: Order::Little, ..reg(Table::Holding, 0, ValueType::F32) };
        assert_eq!(one(cdab, vec![f[1], f[0]]), Sample::Value(642.15));
        let badc = Register { byte_order: Order::Little, ..reg(Table::Holding, 0, ValueType::F32) };
        assert_eq!(one(badc, vec![f[0].swap_bytes(), f[1].swap_bytes()]), Sample::Value(642.15));
        let d = 9065.2431640625f64.to_bits();
        let dw = vec![(d >> 48) as u16, (d >> 32) as u16, (d >> 16) as u16, d as u16];
        assert_eq!(one(reg(Table::Input, 0, ValueType::F64), dw), Sample::Value(9065.243));
        assert_eq!(one(reg(Table::Holding, 0, ValueType::I16), vec![0xfffe]), Sample::Value(-2.0));
        assert_eq!(
            one(reg(Table::Holding, 0, ValueType::U16), vec![0xfffe]),
            Sample::Value(65534.0)
        );
        let i32w = (-70000i32) as u32;
        let words = vec![(i32w >> 16) as u16, i32w as u16];
        assert_eq!(one(reg(Table::Holding, 0, ValueType::I32), words), Sample::Value(-70000.0));
        let scaled =
            Register { scale: 0.01, offset: -1.0, ..reg(Table::Holding, 0, ValueType::U32) };
        assert_eq!(one(scaled, vec![0x0003, 0xa4d6]), Sample::Value(2387.06));
        assert_eq!(one(reg(Table::Holding, 0, ValueType::Bool), vec![7]), Sample::Value(1.0));
        let bit = |n| Register { bit: Some(n), ..reg(Table::Holding, 0, ValueType::Bool) };
        assert_eq!(one(bit(3), vec![0b1000]), Sample::Value(1.0));
        assert_eq!(one(bit(2), vec![0b1000]), Sample::Value(0.0));
        assert_eq!(one(bit(15), vec![0x8000]), Sample::Value(1.0));
    }

    #[test]
    fn bits_failures_short_answers_and_non_finite_values_are_samples_not_errors() {
        let map = Map::new(vec![
            Some(reg(Table::Holding, 0, ValueType::F32)),
            Some(reg(Table::Holding, 2, ValueType::F32)),
            Some(reg(Table::Input, 0, ValueType::U16)),
            Some(reg(Table::Discrete, 3, ValueType::Bool)),
            None,
        ]);
        let nan = words_of_f32(f32::NAN);
        let answers = [
            Answer::Words(vec![nan[0], nan[1], 1]),
            Answer::Failed(Fault::Exception),
            Answer::Bits(vec![true]),
        ];
        assert_eq!(
            map.reading(&answers),
            vec![
                Sample::NonFinite,
                Sample::Unavailable(Fault::BadResponse),
                Sample::Unavailable(Fault::Exception),
                Sample::Value(1.0),
                Sample::Missing,
            ]
        );
        let huge = Register { scale: 1e300, ..reg(Table::Holding, 0, ValueType::U16) };
        assert_eq!(
            Map::new(vec![Some(huge)]).reading(&[Answer::Words(vec![9])]),
            vec![Sample::NonFinite]
        );
    }

    #[test]
    fn a_register_that_cannot_be_read_as_configured_says_why() {
        assert!(reg(Table::Coil, 0, ValueType::F32).check().unwrap_err().contains("bool"));
        let past_the_end = reg(Table::Holding, 65535, ValueType::F32).check().unwrap_err();
        assert!(past_the_end.contains("too high"), "{past_the_end}");
        assert!(reg(Table::Holding, 65534, ValueType::F32).check().is_ok());
        assert!(reg(Table::Holding, 65535, ValueType::U16).check().is_ok());
        let bit = |n, t, v| Register { bit: Some(n), ..reg(t, 0, v) };
        assert!(bit(16, Table::Holding, ValueType::Bool).check().unwrap_err().contains("0 to 15"));
        assert!(bit(1, Table::Holding, ValueType::U16).check().is_err());
        assert!(bit(1, Table::Coil, ValueType::Bool).check().is_err());
        assert!(bit(15, Table::Input, ValueType::Bool).check().is_ok());
        let zero = Register { scale: 0.0, ..reg(Table::Holding, 0, ValueType::U16) };
        assert!(zero.check().unwrap_err().contains("scale"));
    }
}
