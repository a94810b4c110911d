//! An MLIR bytecode writer for small modules (the format of `mlir/docs/BytecodeFormat.md`,
//! version 6, as MLIR's reader in jaxlib and libtpu reads it).
//!
//! Attributes and types are written in their assembly form (the format's fallback encoding,
//! which the reader parses with the dialect's own parser), operation attributes as one
//! dictionary (the reader moves a registered op's inherent attributes into its properties, as
//! it does for bytecode older than properties), and every location as `loc(unknown)`. No
//! region is marked isolated from above, so every value lives in one scope: see
//! [`Operation::operands`].

use std::collections::HashMap;

/// The bytecode version written: the reader's current one (MLIR 20 and later), which is what
/// JAX writes its StableHLO artifacts in.
const VERSION: u64 = 6;

/// Operation-encoding flags (`bytecode::OpEncodingMask`).
const HAS_ATTRS: u8 = 0b0000_0001;
const HAS_RESULTS: u8 = 0b0000_0010;
const HAS_OPERANDS: u8 = 0b0000_0100;
const HAS_INLINE_REGIONS: u8 = 0b0001_0000;

/// Section ids (`bytecode::Section::ID`).
const STRING_SECTION: u8 = 0;
const DIALECT_SECTION: u8 = 1;
const ATTR_TYPE_SECTION: u8 = 2;
const ATTR_TYPE_OFFSET_SECTION: u8 = 3;
const IR_SECTION: u8 = 4;
const PROPERTIES_SECTION: u8 = 8;

/// One operation, in MLIR's generic terms.
#[derive(Clone, Debug, PartialEq)]
pub struct Operation {
    /// `dialect.name`, e.g. `vhlo.return_v1`.
    pub name: String,
    /// The attribute dictionary in assembly form (`{a = 1 : i32}`), if it has attributes.
    pub attributes: Option<String>,
    /// The result types, in assembly form.
    pub results: Vec<String>,
    /// The operand values, by number: the values of a region are its blocks' arguments then
    /// its operations' results, in order, numbered after the values of every enclosing region.
    pub operands: Vec<u64>,
    pub regions: Vec<Vec<Block>>,
}

/// A block: its arguments' types (assembly form) and its operations.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub arguments: Vec<String>,
    pub operations: Vec<Operation>,
}

/// `op` as an MLIR bytecode file whose producer string is `producer`.
pub fn write(producer: &str, op: &Operation) -> Vec<u8> {
    // The reader's top-level scope holds no values: a top-level op cannot have results.
    debug_assert!(op.results.is_empty(), "a top-level op with results");
    let mut tables = Tables::default();
    tables.collect(op);
    let mut ir = Vec::new();
    // The file's top-level block: one operation, no arguments.
    varint(&mut ir, 1 << 1);
    tables.operation(&mut ir, op);

    let mut out = b"ML\xefR".to_vec();
    varint(&mut out, VERSION);
    out.extend_from_slice(producer.as_bytes());
    out.push(0);
    section(&mut out, STRING_SECTION, &tables.string_section());
    section(&mut out, DIALECT_SECTION, &tables.dialect_section());
    let (entries, offsets) = tables.attr_type_sections();
    section(&mut out, ATTR_TYPE_SECTION, &entries);
    section(&mut out, ATTR_TYPE_OFFSET_SECTION, &offsets);
    section(&mut out, IR_SECTION, &ir);
    // Required from version 5 on; empty, as no operation carries encoded properties.
    section(&mut out, PROPERTIES_SECTION, &[]);
    out
}

/// The numbered tables a bytecode file refers into: strings, dialects, operation names
/// ((dialect number, string number of the name without its dialect)), attributes and types
/// ((dialect number, assembly form)).
#[derive(Default)]
struct Tables {
    strings: Numbered<String>,
    dialects: Numbered<String>,
    op_names: Numbered<(usize, usize)>,
    attributes: Numbered<(usize, String)>,
    types: Numbered<(usize, String)>,
}

/// Distinct keys numbered in first-use order, each with what the file records for it.
struct Numbered<T> {
    items: Vec<T>,
    numbers: HashMap<String, usize>,
}

impl<T> Default for Numbered<T> {
    fn default() -> Self {
        Numbered { items: Vec::new(), numbers: HashMap::new() }
    }
}

impl<T> Numbered<T> {
    fn number(&mut self, key: &str, item: T) -> usize {
        if let Some(&n) = self.numbers.get(key) {
            return n;
        }
        self.items.push(item);
        self.numbers.insert(key.to_string(), self.items.len() - 1);
        self.items.len() - 1
    }

    /// The number of a key [`Numbered::number`] has seen (0 otherwise: the writer numbers
    /// everything before it writes).
    fn of(&self, key: &str) -> u64 {
        debug_assert!(self.numbers.contains_key(key), "`{key}` was not numbered");
        self.numbers.get(key).copied().unwrap_or(0) as u64
    }
}

/// The dialect an attribute or type in assembly form belongs to: `#vhlo.string_v1<…>` and
/// `!vhlo.f32_v1` to `vhlo`, builtin spellings (`{…}`, `loc(…)`, `i32`) to `builtin`.
fn dialect_of(assembly: &str) -> &str {
    match assembly.strip_prefix(['#', '!']) {
        Some(rest) => rest.split(['.', '<']).next().unwrap_or("builtin"),
        None => "builtin",
    }
}

const UNKNOWN_LOCATION: &str = "loc(unknown)";

impl Tables {
    /// Numbers everything `op` refers to, in the order the writer meets it.
    fn collect(&mut self, op: &Operation) {
        self.dialect("builtin");
        self.attribute(UNKNOWN_LOCATION);
        self.visit(op);
    }

    fn visit(&mut self, op: &Operation) {
        self.op_name(&op.name);
        if let Some(attributes) = &op.attributes {
            self.attribute(attributes);
        }
        for t in &op.results {
            self.type_number(t);
        }
        for block in op.regions.iter().flatten() {
            for t in &block.arguments {
                self.type_number(t);
            }
            for inner in &block.operations {
                self.visit(inner);
            }
        }
    }

    /// A dialect's number; its name is a string of the string table too.
    fn dialect(&mut self, name: &str) -> usize {
        self.strings.number(name, name.to_string());
        self.dialects.number(name, name.to_string())
    }

    fn op_name(&mut self, name: &str) -> usize {
        let (dialect, short) = name.split_once('.').unwrap_or(("builtin", name));
        let entry = (self.dialect(dialect), self.strings.number(short, short.to_string()));
        self.op_names.number(name, entry)
    }

    fn attribute(&mut self, assembly: &str) -> usize {
        let dialect = self.dialect(dialect_of(assembly));
        self.attributes.number(assembly, (dialect, assembly.to_string()))
    }

    fn type_number(&mut self, assembly: &str) -> usize {
        let dialect = self.dialect(dialect_of(assembly));
        self.types.number(assembly, (dialect, assembly.to_string()))
    }

    /// The string section: the count, each string's size (NUL included) in reverse order,
    /// then the NUL-terminated strings.
    fn string_section(&self) -> Vec<u8> {
        let mut out = Vec::new();
        varint(&mut out, self.strings.items.len() as u64);
        for s in self.strings.items.iter().rev() {
            varint(&mut out, s.len() as u64 + 1);
        }
        for s in &self.strings.items {
            out.extend_from_slice(s.as_bytes());
            out.push(0);
        }
        out
    }

    /// The dialect section: each dialect's name (unversioned), the number of operation names,
    /// then the operation names grouped by dialect (each marked registered).
    fn dialect_section(&self) -> Vec<u8> {
        let mut out = Vec::new();
        varint(&mut out, self.dialects.items.len() as u64);
        for d in &self.dialects.items {
            varint(&mut out, self.strings.of(d) << 1);
        }
        varint(&mut out, self.op_names.items.len() as u64);
        for (dialect, names) in group_by_dialect(&self.op_names.items, |&(d, _)| d) {
            varint(&mut out, dialect as u64);
            varint(&mut out, names.len() as u64);
            for &(_, name) in names {
                varint(&mut out, ((name as u64) << 1) | 1);
            }
        }
        out
    }

    /// The attribute/type section (each entry its NUL-terminated assembly form) and its offset
    /// section (the counts, then each dialect group's entry sizes, flagged as assembly form).
    fn attr_type_sections(&self) -> (Vec<u8>, Vec<u8>) {
        let mut entries = Vec::new();
        let mut offsets = Vec::new();
        varint(&mut offsets, self.attributes.items.len() as u64);
        varint(&mut offsets, self.types.items.len() as u64);
        for table in [&self.attributes.items, &self.types.items] {
            for (dialect, group) in group_by_dialect(table, |(d, _)| *d) {
                varint(&mut offsets, dialect as u64);
                varint(&mut offsets, group.len() as u64);
                for (_, assembly) in group {
                    entries.extend_from_slice(assembly.as_bytes());
                    entries.push(0);
                    varint(&mut offsets, (assembly.len() as u64 + 1) << 1);
                }
            }
        }
        (entries, offsets)
    }

    fn operation(&self, out: &mut Vec<u8>, op: &Operation) {
        let mut mask = 0;
        if op.attributes.is_some() {
            mask |= HAS_ATTRS;
        }
        if !op.results.is_empty() {
            mask |= HAS_RESULTS;
        }
        if !op.operands.is_empty() {
            mask |= HAS_OPERANDS;
        }
        if !op.regions.is_empty() {
            mask |= HAS_INLINE_REGIONS;
        }
        varint(out, self.op_names.of(&op.name));
        out.push(mask);
        varint(out, self.attributes.of(UNKNOWN_LOCATION));
        if let Some(attributes) = &op.attributes {
            varint(out, self.attributes.of(attributes));
        }
        if !op.results.is_empty() {
            varint(out, op.results.len() as u64);
            for t in &op.results {
                varint(out, self.types.of(t));
            }
        }
        if !op.operands.is_empty() {
            varint(out, op.operands.len() as u64);
            for &v in &op.operands {
                varint(out, v);
            }
        }
        if !op.regions.is_empty() {
            // Not isolated from above: the regions follow inline and share one value scope.
            varint(out, (op.regions.len() as u64) << 1);
            for region in &op.regions {
                self.region(out, region);
            }
        }
    }

    fn region(&self, out: &mut Vec<u8>, blocks: &[Block]) {
        varint(out, blocks.len() as u64);
        if blocks.is_empty() {
            return;
        }
        let values: usize = blocks.iter().map(|b| b.arguments.len() + b.operations.iter().map(|o| o.results.len()).sum::<usize>()).sum();
        varint(out, values as u64);
        for block in blocks {
            let has_arguments = !block.arguments.is_empty();
            varint(out, ((block.operations.len() as u64) << 1) | u64::from(has_arguments));
            if has_arguments {
                varint(out, block.arguments.len() as u64);
                for t in &block.arguments {
                    // The type, flagged as having no location (unknown).
                    varint(out, self.types.of(t) << 1);
                }
                // No use-list orders.
                out.push(0);
            }
            for op in &block.operations {
                self.operation(out, op);
            }
        }
    }
}

/// Consecutive runs of `items` with the same dialect. Tables are numbered in first-use
/// order, so one dialect's entries may come in several runs: each run is its own group.
fn group_by_dialect<T>(items: &[T], dialect: impl Fn(&T) -> usize) -> Vec<(usize, &[T])> {
    let mut groups = Vec::new();
    let mut start = 0;
    for i in 1..=items.len() {
        if i == items.len() || dialect(&items[i]) != dialect(&items[start]) {
            groups.push((dialect(&items[start]), &items[start..i]));
            start = i;
        }
    }
    groups
}

/// A section: its id (unaligned), its length, its data.
fn section(out: &mut Vec<u8>, id: u8, data: &[u8]) {
    out.push(id);
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// MLIR's "PrefixVarInt": the count of trailing zero bits of the first byte is the number of
/// bytes that follow; a first byte of zero means eight little-endian bytes follow.
pub(crate) fn varint(out: &mut Vec<u8>, value: u64) {
    let mut bytes = 1;
    while bytes < 9 && value >> (7 * bytes) != 0 {
        bytes += 1;
    }
    if bytes == 9 {
        out.push(0);
        out.extend_from_slice(&value.to_le_bytes());
        return;
    }
    let encoded = ((value << 1) | 1) << (bytes - 1);
    out.extend_from_slice(&encoded.to_le_bytes()[..bytes]);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes one varint as the format defines it (independently of the writer's loop).
    fn decode(bytes: &[u8]) -> (u64, usize) {
        let first = bytes[0];
        if first == 0 {
            return (u64::from_le_bytes(bytes[1..9].try_into().unwrap()), 9);
        }
        let extra = first.trailing_zeros() as usize;
        let mut value = 0u64;
        for (i, b) in bytes[..=extra].iter().enumerate() {
            value |= u64::from(*b) << (8 * i);
        }
        (value >> (extra + 1), extra + 1)
    }

    #[test]
    fn varints_round_trip_at_every_width() {
        for shift in 0..64 {
            for value in [(1u64 << shift) - 1, 1u64 << shift, (1u64 << shift) + 1] {
                let mut out = Vec::new();
                varint(&mut out, value);
                assert_eq!(decode(&out), (value, out.len()), "{value}");
            }
        }
        let mut out = Vec::new();
        varint(&mut out, 5);
        assert_eq!(out, [0x0b]);
    }

    #[test]
    fn dialects_come_from_the_assembly_prefix() {
        assert_eq!(dialect_of("#vhlo.string_v1<\"a\">"), "vhlo");
        assert_eq!(dialect_of("!vhlo.tensor_v1<2x!vhlo.f32_v1>"), "vhlo");
        assert_eq!(dialect_of("#vhlo<api_version_v1 API_VERSION_ORIGINAL>"), "vhlo");
        assert_eq!(dialect_of("{a = 1 : i32}"), "builtin");
        assert_eq!(dialect_of("loc(unknown)"), "builtin");
    }
}
