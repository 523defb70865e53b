//! A Python module's imports, fetched before the interpreter asks for them.
//!
//! An interpreter that starts imports its modules one after another: it
//! reads a module's compiled file (`__pycache__/NAME.cpython-3XY.pyc`),
//! runs it, and only then reads the modules that one imports. On a lazily
//! fetched layer each of those is a round trip, in series: `import json`
//! on Python 3.11 is 17 files (json, its decoder, `re`, `enum`,
//! `functools`, `collections`...), 0.85 s at RTT 40 ms. Once a module's
//! `.pyc` is cached, the modules its top-level code imports are known, so
//! the files of them this layer holds are fetched at once, and each one's
//! imports as it arrives: the chain costs a round trip per level of the
//! import graph (five for `json`), not one per module.
//!
//! By value: a module's top-level imports run when it is imported (an
//! import inside a function may never run and is not followed). Names
//! that are not modules of this layer cost a lookup and nothing more.
//!
//! The first modules are known before any `.pyc` is read: a process
//! whose command line is a Python interpreter's (`python3 -c 'import
//! json'`, `python3 -m http.server`) will read `encodings` (the first
//! module CPython reads from disk) and the modules its `-c` code or `-m`
//! names. On the interpreter's first miss in a layer holding a standard
//! library (`/usr/lib/python3.N`, `/usr/local/lib/python3.N`), those are
//! fetched, and their imports as they arrive: the chain runs while the
//! loader is still fetching the interpreter's libraries, not after. The
//! command line (`/proc/PID/cmdline` of the process a FUSE read names) is
//! the workload's own input, read bounded and parsed without recursion.
//!
//! What is read: the `.pyc` header's magic number (Python 3.8 to 3.12:
//! their code objects' layout and opcode numbers are known here), then
//! the module's code object (marshal format): its bytecode, its names and
//! its file name. `IMPORT_NAME` and `IMPORT_FROM` instructions name the
//! modules; the file name (`/usr/lib/python3.11/json/__init__.py`) gives
//! the package directory (relative imports) and the standard library's
//! directory (absolute ones, with `lib-dynload`, `site-packages` and
//! Debian's `dist-packages`). The reader never recurses: nested objects
//! are skipped with an explicit stack of bounded depth, every length is
//! checked against the bytes left, and anything malformed is "not a
//! module" and costs nothing more. All bytes read here came from the
//! cache, verified.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::sync::{Arc, Mutex, OnceLock};

use crate::fetch::Hint;
use crate::format::FileKind;
use crate::layer::hints::elf::{resolve_dir, resolve_file};
use crate::layer::{CachedRead, Layer, plan};

/// The largest `.pyc` looked at (the standard library's largest is about
/// 500 KiB).
const MAX_PYC: u64 = 4 << 20;
/// Nesting of marshal containers (code objects within constants within
/// code objects...) a `.pyc` may have; real ones stay far below.
const MAX_DEPTH: usize = 256;
/// Module names taken from one file.
const MAX_IMPORTS: usize = 512;
/// Entries of a directory looked through for an extension module.
const MAX_LISTED: usize = 8192;
/// The longest module name followed, and its most dotted parts: what a
/// hostile file names costs lookups in proportion to these.
const MAX_NAME: usize = 255;
const MAX_PARTS: usize = 16;
/// The longest string kept for `r` references, and the most names of one
/// tuple kept: a reference is a 5-byte copy of what it names, so a hostile
/// file of references to one long string would otherwise copy it
/// hundreds of thousands of times.
const MAX_REF_STRING: usize = 1024;
const MAX_NAMES: usize = 4096;

/// A module name's dotted parts, if it is one worth looking up: bounded,
/// no empty part, no `..`.
fn parts(name: &[u8]) -> Option<Vec<&[u8]>> {
    let parts: Vec<&[u8]> = name.split(|&b| b == b'.').collect();
    let bad = name.len() > MAX_NAME
        || parts.len() > MAX_PARTS
        || parts.iter().any(|p| p.is_empty() || *p == b"..");
    (!bad).then_some(parts)
}

/// A compiled module: where its source was, the interpreter's tag
/// (`cpython-311`), and the modules its top-level code imports, dotted
/// (`os.path`, `json.scanner`; a relative `from . import x` is `x`).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Pyc {
    pub filename: Vec<u8>,
    pub tag: &'static str,
    pub imports: Vec<Vec<u8>>,
}

/// A layer's memory of Python interpreters: the standard libraries it
/// holds, and the command lines already acted on.
#[derive(Default)]
pub(crate) struct Interpreters {
    roots: OnceLock<Vec<(Vec<u8>, &'static str)>>,
    seen: Mutex<HashSet<u64>>,
}

/// What is known of one interpreter version's `.pyc` files.
struct Version {
    magic: std::ops::RangeInclusive<u16>,
    tag: &'static str,
    /// A code object's fields in marshal order.
    layout: &'static [Step],
    /// Of the objects of the first `Step::Objects` run: where the file
    /// name is (the bytecode is at 0, the constants at 1, the names at 2).
    filename_at: usize,
}

#[derive(Clone, Copy)]
enum Step {
    /// 32-bit integers.
    Ints(usize),
    /// Marshalled objects.
    Objects(u32),
}

/// 3.8 to 3.10: argcount, posonlyargcount, kwonlyargcount, nlocals,
/// stacksize, flags; code, consts, names, varnames, freevars, cellvars,
/// filename, name; firstlineno; lnotab.
const LAYOUT_38: &[Step] = &[
    Step::Ints(6),
    Step::Objects(8),
    Step::Ints(1),
    Step::Objects(1),
];
/// 3.11 and 3.12: argcount, posonlyargcount, kwonlyargcount, stacksize,
/// flags; code, consts, names, localsplusnames, localspluskinds, filename,
/// name, qualname; firstlineno; linetable, exceptiontable.
const LAYOUT_311: &[Step] = &[
    Step::Ints(5),
    Step::Objects(8),
    Step::Ints(1),
    Step::Objects(2),
];

/// Magic numbers by release (alphas and betas included), from CPython's
/// `Lib/importlib/_bootstrap_external.py`.
const VERSIONS: &[Version] = &[
    Version {
        magic: 3400..=3419,
        tag: "cpython-38",
        layout: LAYOUT_38,
        filename_at: 6,
    },
    Version {
        magic: 3420..=3429,
        tag: "cpython-39",
        layout: LAYOUT_38,
        filename_at: 6,
    },
    Version {
        magic: 3430..=3449,
        tag: "cpython-310",
        layout: LAYOUT_38,
        filename_at: 6,
    },
    Version {
        magic: 3450..=3499,
        tag: "cpython-311",
        layout: LAYOUT_311,
        filename_at: 5,
    },
    Version {
        magic: 3500..=3549,
        tag: "cpython-312",
        layout: LAYOUT_311,
        filename_at: 5,
    },
];

/// Opcodes, the same from 3.8 to 3.12.
const IMPORT_NAME: u8 = 108;
const IMPORT_FROM: u8 = 109;
const EXTENDED_ARG: u8 = 144;

/// The header a `.pyc` starts with: magic (2 bytes and `\r\n`), flags,
/// then a timestamp and size or a hash.
const HEADER: usize = 16;

fn version(head: &[u8]) -> Option<&'static Version> {
    let magic = u16::from_le_bytes([*head.first()?, *head.get(1)?]);
    if head.get(2..4)? != b"\r\n" {
        return None;
    }
    VERSIONS.iter().find(|v| v.magic.contains(&magic))
}

/// The module in `data`, a whole `.pyc` file, or `None` if it is not one
/// this reader knows (or is malformed).
pub(crate) fn read_pyc(data: &[u8]) -> Option<Pyc> {
    let version = version(data)?;
    let mut r = Reader {
        data,
        at: HEADER,
        refs: Vec::new(),
        layout: version.layout,
    };
    let t = r.u8()?;
    if t & 0x7f != b'c' {
        return None;
    }
    if t & FLAG_REF != 0 {
        r.refs.push(Value::Other);
    }
    let Step::Ints(ints) = version.layout[0] else {
        return None;
    };
    r.take(4 * ints)?;
    let Value::Bytes(code) = r.value()? else {
        return None;
    };
    r.skip()?; // consts
    let Value::Strs(names) = r.value()? else {
        return None;
    };
    for _ in 3..version.filename_at {
        r.skip()?;
    }
    let Value::Str(filename) = r.value()? else {
        return None;
    };
    let mut imports = imports(&code, &names);
    if filename.ends_with(b"/encodings/__init__.py") {
        for name in STARTUP {
            if imports.len() < MAX_IMPORTS && !imports.iter().any(|i| i == name) {
                imports.push(name.to_vec());
            }
        }
    }
    Some(Pyc {
        filename,
        tag: version.tag,
        imports,
    })
}

/// What CPython imports at startup right after the `encodings` package,
/// by names no bytecode holds: the codec of its UTF-8 default (the C
/// locale's too, since 3.7), which the codec search function imports by
/// name, and the modules its frozen `site` tries. The package's `__init__`
/// is the first module it reads from disk, so this is where they are known.
const STARTUP: [&[u8]; 3] = [b"encodings.utf_8", b"sitecustomize", b"usercustomize"];

/// The longest command line looked at.
const MAX_CMDLINE: u64 = 8 << 10;
/// Command lines remembered per layer, each acted on once.
const MAX_COMMANDS: usize = 1024;
/// The directories a standard library (`pythonX.Y`) is looked for in.
const LIB_DIRS: [&[u8]; 2] = [b"/usr/lib", b"/usr/local/lib"];

/// What a Python interpreter's command line will import first.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Command {
    /// The version its program's name gives (`python3.11`: `3.11`).
    pub version: Option<Vec<u8>>,
    /// `encodings`, then the modules of `-c CODE`'s import statements or
    /// `-m MODULE`, dotted as [`Pyc::imports`].
    pub imports: Vec<Vec<u8>>,
}

/// The command of `cmdline` (`/proc/PID/cmdline`: arguments ended by
/// NULs) if its program is `python`, `python3` or `python3.N`.
pub(crate) fn read_command(cmdline: &[u8]) -> Option<Command> {
    let mut args = cmdline.split(|&b| b == 0);
    let program = args.next()?;
    let name = &program[program
        .iter()
        .rposition(|&b| b == b'/')
        .map_or(0, |i| i + 1)..];
    let version = name.strip_prefix(b"python")?;
    let digits = |v: &[u8]| !v.is_empty() && v.iter().all(u8::is_ascii_digit);
    let version = match version {
        b"" | b"3" => None,
        v => match v.strip_prefix(b"3.") {
            Some(minor) if digits(minor) => Some(v.to_vec()),
            _ => return None,
        },
    };
    let mut imports = vec![b"encodings".to_vec()];
    while let Some(arg) = args.next() {
        // Options may be joined (`-Bc CODE`, `-uc` `CODE`); `-c`, `-m`, `-W`
        // and `-X` take the rest of the argument, or the next one.
        let Some(flags) = arg
            .strip_prefix(b"-")
            .filter(|f| !f.is_empty() && f[0] != b'-')
        else {
            if arg == b"--check-hash-based-pycs" {
                args.next();
                continue;
            }
            if arg.starts_with(b"--") && arg.len() > 2 {
                continue;
            }
            break; // a script, `-` or `--`: nothing known
        };
        let Some(at) = flags.iter().position(|f| b"cmWX".contains(f)) else {
            continue;
        };
        let rest = &flags[at + 1..];
        let value = if rest.is_empty() {
            args.next()
        } else {
            Some(rest)
        };
        match (flags[at], value) {
            (b'c', Some(code)) => {
                code_imports(code, &mut imports);
                break;
            }
            (b'm', Some(module)) => {
                imports.push(module.to_vec());
                break;
            }
            (b'W' | b'X', Some(_)) => {}
            _ => break,
        }
    }
    Some(Command { version, imports })
}

/// Adds to `out` the modules of `code`'s simple statements `import a.b
/// [as c], d` (`a.b`, `d`) and `from a import b, c` (`a`, `a.b`, `a.c`), as
/// the bytecode would name them; relative imports name nothing here.
fn code_imports(code: &[u8], out: &mut Vec<Vec<u8>>) {
    let mut push = |name: Vec<u8>| {
        if out.len() < MAX_IMPORTS && !out.contains(&name) {
            out.push(name);
        }
    };
    let mut depth = 0_usize;
    let statements = code.split(|&b| {
        match b {
            b'(' => depth += 1,
            b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
        depth == 0 && (b == b'\n' || b == b';')
    });
    for statement in statements {
        let words: Vec<&[u8]> = statement
            .split(|&b| b.is_ascii_whitespace() || b"(),".contains(&b))
            .filter(|w| !w.is_empty())
            .collect();
        let (module, names) = match words.as_slice() {
            [b"import", names @ ..] => (None, names),
            [b"from", module, b"import", names @ ..] if !module.starts_with(b".") => {
                push(module.to_vec());
                (Some(*module), names)
            }
            _ => continue,
        };
        let mut alias = false;
        for name in names {
            match (alias, *name) {
                (false, b"as") => alias = true,
                (true, _) => alias = false,
                (false, b"*") => {}
                (false, name) => push(match module {
                    Some(m) => [m, b".", name].concat(),
                    None => name.to_vec(),
                }),
            }
        }
    }
}

/// The modules `IMPORT_NAME` and `IMPORT_FROM` instructions of `code`
/// name, in order, once each.
fn imports(code: &[u8], names: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut push = |name: Vec<u8>| {
        if !name.is_empty() && out.len() < MAX_IMPORTS && !out.contains(&name) {
            out.push(name);
        }
    };
    let (mut ext, mut last): (u32, Option<&[u8]>) = (0, None);
    for unit in code.chunks_exact(2) {
        let (op, arg) = (unit[0], u32::from(unit[1]));
        if op == EXTENDED_ARG {
            ext = (ext | arg).checked_shl(8).unwrap_or(0);
            continue;
        }
        let name = usize::try_from(ext | arg).ok().and_then(|i| names.get(i));
        ext = 0;
        match (op, name) {
            (IMPORT_NAME, Some(name)) => {
                last = Some(name);
                push(name.clone());
            }
            (IMPORT_FROM, Some(from)) => match last {
                Some(module) if !module.is_empty() => push([module, b".", from].concat()),
                _ => push(from.clone()),
            },
            _ => {}
        }
    }
    out
}

/// A marshal object's "remember me" bit: later `r` objects refer to it by
/// its place among the flagged ones.
const FLAG_REF: u8 = 0x80;

/// What a reader keeps of an object: strings and bytes (and a tuple of
/// strings), nothing of anything else.
#[derive(Clone, Debug)]
enum Value {
    Str(Vec<u8>),
    Bytes(Vec<u8>),
    Strs(Vec<Vec<u8>>),
    Other,
}

/// What a skip has yet to read.
enum Frame {
    Objects(u32),
    /// Key and value pairs up to a `0` key.
    Dict,
    /// The next step of a code object's layout.
    Code(usize),
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
    /// The flagged objects so far, in order: strings kept for `r`.
    refs: Vec<Value>,
    layout: &'static [Step],
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let got = self.data.get(self.at..end)?;
        self.at = end;
        Some(got)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A count of objects that follow: each takes a byte at least.
    fn count(&mut self, n: u32) -> Option<u32> {
        (usize::try_from(n).ok()? <= self.data.len() - self.at).then_some(n)
    }

    /// One object, kept if it is a string, bytes, a reference to a string,
    /// or a tuple of strings; skipped otherwise.
    fn value(&mut self) -> Option<Value> {
        let t = *self.data.get(self.at)?;
        match t & 0x7f {
            b'r' => {
                self.at += 1;
                let i = usize::try_from(self.u32()?).ok()?;
                self.refs.get(i).cloned()
            }
            b'(' | b')' => {
                self.at += 1;
                let n = if t & 0x7f == b')' {
                    u32::from(self.u8()?)
                } else {
                    let n = self.u32()?;
                    self.count(n)?
                };
                if t & FLAG_REF != 0 {
                    self.refs.push(Value::Other);
                }
                let mut strs = Vec::new();
                for _ in 0..n {
                    let kind = *self.data.get(self.at)? & 0x7f;
                    let stringy =
                        matches!(kind, b'r' | b's' | b't' | b'u' | b'a' | b'A' | b'z' | b'Z');
                    if stringy && strs.len() < MAX_NAMES {
                        if let Value::Str(s) = self.value()? {
                            strs.push(s);
                        }
                    } else {
                        self.skip()?;
                    }
                }
                Some(Value::Strs(strs))
            }
            _ => {
                let start = self.at;
                self.skip()?;
                let string = |from: usize| self.data.get(from..self.at).map(<[u8]>::to_vec);
                Some(match t & 0x7f {
                    b's' => Value::Bytes(string(start + 5)?),
                    b't' | b'u' | b'a' | b'A' => Value::Str(string(start + 5)?),
                    b'z' | b'Z' => Value::Str(string(start + 2)?),
                    _ => Value::Other,
                })
            }
        }
    }

    /// Reads past one object and everything in it, without recursing.
    fn skip(&mut self) -> Option<()> {
        let mut stack = vec![Frame::Objects(1)];
        while let Some(top) = stack.last_mut() {
            match top {
                Frame::Objects(0) => {
                    stack.pop();
                    continue;
                }
                Frame::Objects(n) => *n -= 1,
                Frame::Dict => {
                    if *self.data.get(self.at)? & 0x7f == b'0' {
                        self.at += 1;
                        stack.pop();
                    } else {
                        stack.push(Frame::Objects(2));
                    }
                    continue;
                }
                Frame::Code(step) => {
                    let Some(s) = self.layout.get(*step).copied() else {
                        stack.pop();
                        continue;
                    };
                    *step += 1;
                    match s {
                        Step::Ints(n) => {
                            self.take(4 * n)?;
                        }
                        Step::Objects(n) => stack.push(Frame::Objects(n)),
                    }
                    continue;
                }
            }
            if let Some(frame) = self.object()? {
                if stack.len() >= MAX_DEPTH {
                    return None;
                }
                stack.push(frame);
            }
        }
        Some(())
    }

    /// Reads one object's type and its own bytes; a container's contents
    /// are left to the caller, as the frame returned.
    fn object(&mut self) -> Option<Option<Frame>> {
        let t = self.u8()?;
        let slot = self.refs.len();
        if t & FLAG_REF != 0 {
            self.refs.push(Value::Other);
        }
        let frame = match t & 0x7f {
            b'0' | b'N' | b'F' | b'T' | b'S' | b'.' => None,
            b'i' | b'r' => {
                self.take(4)?;
                None
            }
            b'I' | b'g' => {
                self.take(8)?;
                None
            }
            b'y' => {
                self.take(16)?;
                None
            }
            b'f' => {
                let n = self.u8()?;
                self.take(usize::from(n))?;
                None
            }
            b'x' => {
                for _ in 0..2 {
                    let n = self.u8()?;
                    self.take(usize::from(n))?;
                }
                None
            }
            b'l' => {
                let n = self.u32()?.cast_signed().unsigned_abs();
                self.take(usize::try_from(n).ok()?.checked_mul(2)?)?;
                None
            }
            kind @ (b's' | b't' | b'u' | b'a' | b'A' | b'z' | b'Z') => {
                let n = if matches!(kind, b'z' | b'Z') {
                    usize::from(self.u8()?)
                } else {
                    usize::try_from(self.u32()?).ok()?
                };
                let bytes = self.take(n)?.to_vec();
                // Kept for the `r` objects that may name it later (a
                // module's file name often is one, to its first function's).
                if t & FLAG_REF != 0
                    && bytes.len() <= MAX_REF_STRING
                    && let Some(v) = self.refs.get_mut(slot)
                {
                    *v = if kind == b's' {
                        Value::Bytes(bytes)
                    } else {
                        Value::Str(bytes)
                    };
                }
                None
            }
            b'(' | b'[' | b'<' | b'>' => {
                let n = self.u32()?;
                Some(Frame::Objects(self.count(n)?))
            }
            b')' => Some(Frame::Objects(u32::from(self.u8()?))),
            b'{' => Some(Frame::Dict),
            b'c' => Some(Frame::Code(0)),
            _ => return None,
        };
        Some(frame)
    }
}

/// Where module `name` (dotted) of `pyc` may be, as a file: each package
/// on the way (`a`, `a.b`, then `a.b.c` for `a.b.c`), compiled, in the
/// package's directory (relative imports) and in the standard library's
/// search directories. Extension modules are looked for by the caller in
/// the directories of [`extension_dirs`].
pub(crate) fn candidates(pyc: &Pyc, name: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let Some(parts) = parts(name) else {
        return out;
    };
    let frozen = FROZEN_TAGS.contains(&pyc.tag) && FROZEN.contains(&name);
    for (i, base) in bases(&pyc.filename).into_iter().enumerate() {
        if frozen && (i > 0 || is_search_dir(&base)) {
            continue;
        }
        for j in 0..parts.len() {
            let mut dir = base.clone();
            for p in &parts[..j] {
                dir.push(b'/');
                dir.extend_from_slice(p);
            }
            let leaf = parts[j];
            let tag = pyc.tag.as_bytes();
            out.push([&dir[..], b"/__pycache__/", leaf, b".", tag, b".pyc"].concat());
            out.push(
                [
                    &dir[..],
                    b"/",
                    leaf,
                    b"/__pycache__/__init__.",
                    tag,
                    b".pyc",
                ]
                .concat(),
            );
        }
    }
    out
}

/// Modules 3.11 and 3.12 carry frozen in the interpreter and import from
/// there, never from their files (CPython's `Python/frozen.c`, unless run
/// with `-X frozen_modules=off`): an absolute import of one costs nothing,
/// and fetching its file would be bytes no read uses (with its own
/// imports: `abc` brings `_py_abc`, which brings `_weakrefset`).
const FROZEN: [&[u8]; 18] = [
    b"abc",
    b"codecs",
    b"io",
    b"_collections_abc",
    b"_sitebuiltins",
    b"genericpath",
    b"ntpath",
    b"posixpath",
    b"os.path",
    b"os",
    b"site",
    b"stat",
    b"importlib.util",
    b"importlib.machinery",
    b"runpy",
    b"importlib._bootstrap",
    b"importlib._bootstrap_external",
    b"zipimport",
];
const FROZEN_TAGS: [&str; 2] = ["cpython-311", "cpython-312"];

/// Whether `dir` is one of the directories [`bases`] adds for absolute
/// imports (not a package's own).
fn is_search_dir(dir: &[u8]) -> bool {
    let name = dir.rsplit(|&b| b == b'/').next().unwrap_or_default();
    name.starts_with(b"python3")
        || [&b"lib-dynload"[..], b"site-packages", b"dist-packages"].contains(&name)
}

/// The directories an extension module `name` (dotted) may be in, and the
/// prefix its file name starts with (`_json.cpython-311`): its package's
/// directory under each search directory.
pub(crate) fn extension_dirs(pyc: &Pyc, name: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let Some(parts) = parts(name) else {
        return Vec::new();
    };
    let Some((leaf, package)) = parts.split_last() else {
        return Vec::new();
    };
    let prefix = [*leaf, b".", pyc.tag.as_bytes()].concat();
    bases(&pyc.filename)
        .into_iter()
        .map(|mut dir| {
            for p in package {
                dir.push(b'/');
                dir.extend_from_slice(p);
            }
            (dir, prefix.clone())
        })
        .collect()
}

/// The directories imports of a module at `filename` are looked up in:
/// its own (relative imports), then, when it lies under a standard
/// library directory (`.../pythonX.Y`), that one, its `lib-dynload`,
/// `site-packages` and `dist-packages`, and Debian's
/// `/usr/lib/python3/dist-packages`.
fn bases(filename: &[u8]) -> Vec<Vec<u8>> {
    let Some(slash) = filename.iter().rposition(|&b| b == b'/') else {
        return Vec::new();
    };
    let own = filename[..slash].to_vec();
    let mut out = vec![own.clone()];
    let mut root = own.as_slice();
    loop {
        let last = root.iter().rposition(|&b| b == b'/');
        let name = &root[last.map_or(0, |i| i + 1)..];
        if name.starts_with(b"python3") {
            break;
        }
        match last {
            Some(i) if i > 0 => root = &root[..i],
            _ => return out,
        }
    }
    let root = root.to_vec();
    for sub in [
        &b""[..],
        b"/lib-dynload",
        b"/site-packages",
        b"/dist-packages",
    ] {
        let dir = [&root[..], sub].concat();
        if !out.contains(&dir) {
            out.push(dir);
        }
    }
    if root.starts_with(b"/usr/lib/") {
        out.push(b"/usr/lib/python3/dist-packages".to_vec());
    }
    out
}

impl Layer {
    /// After a miss on file `ino`, or once the import hint fetched it: if
    /// it is a compiled Python module, fetches the modules it imports that
    /// this layer holds, each whole, then theirs as they arrive. Each file
    /// is looked at once (again only if it was not cached whole yet).
    pub(in crate::layer) fn prefetch_imports(self: &Arc<Self>, ino: u64) {
        let config = self.fetcher.scheduler().config();
        if config.read_ahead == 0
            || !config.speculate
            || !self
                .imports_examined
                .lock()
                .expect("imports set poisoned")
                .insert(ino)
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let finder = me.clone();
            let Ok(found) = tokio::task::spawn_blocking(move || finder.imported(ino)).await else {
                return;
            };
            for module in found {
                me.prefetch_module(module);
            }
        });
    }

    /// Fetches module file `ino` whole (if it fits what the link carries
    /// in a round trip at most), then looks at it for its own imports.
    fn prefetch_module(self: &Arc<Self>, ino: u64) {
        let Ok(inode) = self.inode(ino) else { return };
        let chunks = self.index.file_chunks(&inode).to_vec();
        let bytes: u64 = chunks.iter().map(|c| c.blob_range.1 - c.blob_range.0).sum();
        if bytes > self.fetcher.scheduler().config().read_ahead_max {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            if me.fetcher.warm_for(Hint::Import, &chunks).await.is_ok() {
                me.prefetch_imports(ino);
            }
        });
    }

    /// The module files of this layer that file `ino` imports, if it is a
    /// compiled module cached whole (blocking: reads the cache).
    fn imported(&self, ino: u64) -> Vec<u64> {
        let Ok(inode) = self.inode(ino) else {
            return Vec::new();
        };
        if inode.kind() != FileKind::Reg || inode.size() < HEADER as u64 || inode.size() > MAX_PYC {
            return Vec::new();
        }
        let chunks = self.index.file_chunks(&inode);
        let read =
            |len: u64| match plan::plan_read(chunks, inode.size(), 0, len, self.fetcher.cache()) {
                CachedRead::Hit(d) if d.len() as u64 == len => Some(d),
                _ => None,
            };
        let head = read(HEADER as u64);
        if head.as_deref().and_then(version).is_none() {
            if head.is_none() {
                self.forget_examined(ino);
            }
            return Vec::new();
        }
        let Some(data) = read(inode.size()) else {
            self.forget_examined(ino);
            return Vec::new();
        };
        let Some(pyc) = read_pyc(&data) else {
            return Vec::new();
        };
        let mut found = Vec::new();
        self.module_files(&pyc, ino, &mut found);
        let examined = self.imports_examined.lock().expect("imports set poisoned");
        found.retain(|f| !examined.contains(f));
        tracing::debug!(
            ino,
            imports = pyc.imports.len(),
            files = found.len(),
            "looked for imports"
        );
        found
    }

    /// Adds to `found` the files of this layer that hold the modules
    /// `pyc` imports, but for `ino` itself (`u64::MAX`: no file of its own).
    fn module_files(&self, pyc: &Pyc, ino: u64, found: &mut Vec<u64>) {
        let mut add = |file: u64| {
            if file != ino && !found.contains(&file) {
                found.push(file);
            }
        };
        for name in &pyc.imports {
            for path in candidates(pyc, name) {
                if let Some(file) = resolve_file(&self.index, &path) {
                    add(file);
                }
            }
            for (dir, prefix) in extension_dirs(pyc, name) {
                let Some(dir) = resolve_dir(&self.index, &dir) else {
                    continue;
                };
                let Some(dir) = self.index.inode(dir) else {
                    continue;
                };
                for (entry, child) in self.index.children(&dir).take(MAX_LISTED) {
                    if entry.starts_with(&prefix) && entry.ends_with(b".so") {
                        add(child);
                    }
                }
            }
        }
    }

    /// After a miss that process `pid` read: if its command line is a
    /// Python interpreter's that this layer has not seen, and this layer
    /// holds a standard library, fetches the modules the command will
    /// import first (see the module docs), then theirs as they arrive.
    pub(crate) fn prefetch_command(self: &Arc<Self>, pid: u32) {
        let config = self.fetcher.scheduler().config();
        if config.read_ahead == 0 || !config.speculate || pid == 0 || self.python_roots().is_empty()
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let finder = me.clone();
            let found = tokio::task::spawn_blocking(move || {
                let mut cmdline = Vec::new();
                let read = std::fs::File::open(format!("/proc/{pid}/cmdline"))
                    .and_then(|f| f.take(MAX_CMDLINE).read_to_end(&mut cmdline));
                if read.is_err() {
                    return Vec::new(); // the process is gone
                }
                finder.command_files(&cmdline)
            });
            for module in found.await.unwrap_or_default() {
                me.prefetch_module(module);
            }
        });
    }

    /// The module files of this layer that command line `cmdline` will
    /// import first, if it is a Python interpreter's not seen before.
    pub(in crate::layer) fn command_files(&self, cmdline: &[u8]) -> Vec<u64> {
        let Some(command) = read_command(cmdline) else {
            return Vec::new();
        };
        let roots = self.python_roots();
        {
            let mut hasher = std::hash::DefaultHasher::new();
            cmdline.hash(&mut hasher);
            let mut seen = self.python.seen.lock().expect("commands set poisoned");
            if roots.is_empty() || seen.len() >= MAX_COMMANDS || !seen.insert(hasher.finish()) {
                return Vec::new();
            }
        }
        let mut found = Vec::new();
        for (root, tag) in roots {
            if command
                .version
                .as_ref()
                .is_some_and(|v| !root.ends_with(&[b"python", &v[..]].concat()))
            {
                continue;
            }
            let pyc = Pyc {
                filename: [&root[..], b"/-c"].concat(),
                tag,
                imports: command.imports.clone(),
            };
            self.module_files(&pyc, u64::MAX, &mut found);
        }
        let examined = self.imports_examined.lock().expect("imports set poisoned");
        found.retain(|f| !examined.contains(f));
        tracing::debug!(
            imports = command.imports.len(),
            files = found.len(),
            "looked at a Python command"
        );
        found
    }

    /// The standard libraries this layer holds (`LIB_DIRS/python3.N` with
    /// an `encodings` package, of a version known here) and their tags,
    /// found once.
    fn python_roots(&self) -> &[(Vec<u8>, &'static str)] {
        self.python.roots.get_or_init(|| {
            let mut out = Vec::new();
            for dir in LIB_DIRS {
                let Some(d) = resolve_dir(&self.index, dir).and_then(|d| self.index.inode(d))
                else {
                    continue;
                };
                for (name, _) in self.index.children(&d).take(MAX_LISTED) {
                    let Some(minor) = name.strip_prefix(b"python3.") else {
                        continue;
                    };
                    let tag = [&b"cpython-3"[..], minor].concat();
                    let Some(version) = VERSIONS.iter().find(|v| v.tag.as_bytes() == tag) else {
                        continue;
                    };
                    let root = [dir, b"/", name].concat();
                    if resolve_dir(&self.index, &[&root[..], b"/encodings"].concat()).is_some() {
                        out.push((root, version.tag));
                    }
                }
            }
            out
        })
    }

    fn forget_examined(&self, ino: u64) {
        self.imports_examined
            .lock()
            .expect("imports set poisoned")
            .remove(&ino);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON_INIT: &[u8] = include_bytes!("testdata/json_init.cpython-311.pyc");
    const JSON_DECODER: &[u8] = include_bytes!("testdata/json_decoder.cpython-311.pyc");

    fn strs(v: &[&str]) -> Vec<Vec<u8>> {
        v.iter().map(|s| s.as_bytes().to_vec()).collect()
    }

    fn command(args: &[&str]) -> Option<Command> {
        read_command(args.join("\0").as_bytes())
    }

    #[test]
    fn a_python_command_line_names_its_first_imports() {
        let c = command(&["python3", "-c", "import json, sys"]).unwrap();
        assert_eq!(c.version, None);
        assert_eq!(c.imports, strs(&["encodings", "json", "sys"]));
        let c = command(&["/usr/bin/python3.11", "-m", "http.server", "8000"]).unwrap();
        assert_eq!(c.version.as_deref(), Some(&b"3.11"[..]));
        assert_eq!(c.imports, strs(&["encodings", "http.server"]));
        // Joined and valued options, statements on lines and after `;`,
        // aliases, parentheses, a star, a relative import.
        let code = "import os.path as p, re\nfrom a.b import (c as d,\n e); from . import x\nfrom m import *";
        let c = command(&[
            "python",
            "-W",
            "ignore",
            "-X",
            "dev",
            "-Bu",
            "--check-hash-based-pycs",
            "never",
            "-Sc",
            code,
        ])
        .unwrap();
        assert_eq!(
            c.imports,
            strs(&["encodings", "os.path", "re", "a.b", "a.b.c", "a.b.e", "m"])
        );
        let c = command(&["python3", "-uc", "import zlib"]).unwrap();
        assert_eq!(c.imports, strs(&["encodings", "zlib"]));
        // A script (read as it runs) or an unfinished option: startup only.
        for args in [
            &["python3", "app.py", "-c", "import x"][..],
            &["python3", "-c"],
            &["python3"],
        ] {
            assert_eq!(
                command(args).unwrap().imports,
                strs(&["encodings"]),
                "{args:?}"
            );
        }
        for other in [
            &["sh", "-c", "import x"][..],
            &["python3x", "-c", "import x"],
            &["python2.7"],
            &["python3.x"],
            &[""],
        ] {
            assert_eq!(command(other), None, "{other:?}");
        }
    }

    /// The fixtures are CPython 3.11's own output (`py_compile` of the
    /// sources in `testdata/README`).
    #[test]
    fn a_modules_top_level_imports_and_its_place_are_read() {
        let init = read_pyc(JSON_INIT).unwrap();
        assert_eq!(init.filename, b"/usr/lib/python3.11/json/__init__.py");
        assert_eq!(init.tag, "cpython-311");
        // `import not_at_start` is inside a function: not followed.
        assert_eq!(
            init.imports,
            strs(&["decoder", "decoder.JSONDecoder", "re", "os.path"])
        );
        let decoder = read_pyc(JSON_DECODER).unwrap();
        assert_eq!(
            decoder.imports,
            strs(&["re", "json", "json.scanner", "_json", "_json.scanstring"])
        );
    }

    /// The `encodings` package is where CPython's startup imports that no
    /// bytecode names are added.
    #[test]
    fn the_encodings_package_brings_the_startup_imports() {
        let pyc = read_pyc(include_bytes!("testdata/encodings_init.cpython-311.pyc")).unwrap();
        assert_eq!(
            pyc.imports,
            strs(&[
                "codecs",
                "aliases",
                "encodings.utf_8",
                "sitecustomize",
                "usercustomize"
            ])
        );
        assert!(
            !read_pyc(JSON_INIT)
                .unwrap()
                .imports
                .contains(&b"sitecustomize".to_vec())
        );
    }

    #[test]
    fn candidates_are_the_package_then_the_library_directories() {
        let pyc = read_pyc(JSON_DECODER).unwrap();
        let c = candidates(&pyc, b"json.scanner");
        let has = |p: &str| c.iter().any(|x| x == p.as_bytes());
        assert!(has(
            "/usr/lib/python3.11/json/__pycache__/__init__.cpython-311.pyc"
        ));
        assert!(has(
            "/usr/lib/python3.11/json/__pycache__/scanner.cpython-311.pyc"
        ));
        assert!(has(
            "/usr/lib/python3.11/json/json/__pycache__/scanner.cpython-311.pyc"
        ));
        assert!(has(
            "/usr/lib/python3/dist-packages/json/__pycache__/scanner.cpython-311.pyc"
        ));
        let e = extension_dirs(&pyc, b"_json");
        assert!(e.contains(&(
            b"/usr/lib/python3.11/lib-dynload".to_vec(),
            b"_json.cpython-311".to_vec()
        )));
        // Nothing outside a name's own directories.
        assert!(candidates(&pyc, b"..x").is_empty());
        assert!(candidates(&pyc, b"a..b").is_empty());
        let long = vec![b'a'; MAX_NAME + 1];
        assert!(candidates(&pyc, &long).is_empty(), "a name too long");
        let dotted = b"a.".repeat(MAX_PARTS);
        assert!(!candidates(&pyc, &dotted[..dotted.len() - 1]).is_empty());
        assert!(
            candidates(&pyc, &[&dotted[..], b"a"].concat()).is_empty(),
            "too many parts"
        );
        assert!(extension_dirs(&pyc, b"").is_empty());
        // A module 3.11 carries frozen: not in the library; a relative
        // import of the same name still in the package's directory.
        let in_json = |name: &[u8]| {
            let c = candidates(&pyc, name);
            !c.is_empty()
                && c.iter()
                    .all(|p| p.starts_with(b"/usr/lib/python3.11/json/"))
        };
        assert!(in_json(b"abc") && in_json(b"os.path"));
        let enum_ = Pyc {
            filename: b"/usr/lib/python3.11/enum.py".to_vec(),
            ..read_pyc(JSON_DECODER).unwrap()
        };
        assert!(candidates(&enum_, b"abc").is_empty());
        assert!(!candidates(&enum_, b"types").is_empty());
        let pkg = Pyc {
            filename: b"/usr/lib/python3/dist-packages/pkg/__init__.py".to_vec(),
            ..read_pyc(JSON_DECODER).unwrap()
        };
        assert_eq!(
            candidates(&pkg, b"io"),
            strs(&[
                "/usr/lib/python3/dist-packages/pkg/__pycache__/io.cpython-311.pyc",
                "/usr/lib/python3/dist-packages/pkg/io/__pycache__/__init__.cpython-311.pyc"
            ])
        );
        let older = Pyc {
            tag: "cpython-310",
            ..read_pyc(JSON_DECODER).unwrap()
        };
        assert!(
            !candidates(&older, b"abc").is_empty(),
            "3.10 reads abc's file"
        );
        // A module outside any pythonX.Y: its own directory only.
        let app = Pyc {
            filename: b"/app/main.py".to_vec(),
            tag: "cpython-311",
            imports: Vec::new(),
        };
        assert_eq!(
            candidates(&app, b"util"),
            strs(&[
                "/app/__pycache__/util.cpython-311.pyc",
                "/app/util/__pycache__/__init__.cpython-311.pyc"
            ])
        );
    }

    /// Hostile input: every prefix of a real file, every byte flipped, a
    /// nesting bomb and counts past the end: an answer or `None`, never a
    /// panic, a recursion or a large allocation.
    #[test]
    fn malformed_files_are_not_modules_and_never_panic() {
        for data in [JSON_INIT, JSON_DECODER] {
            for n in 0..data.len() {
                let _ = read_pyc(&data[..n]);
            }
            for i in 0..data.len() {
                let mut d = data.to_vec();
                d[i] ^= 0xff;
                let _ = read_pyc(&d);
                d[i] ^= 0x55;
                let _ = read_pyc(&d);
            }
        }
        let mut head = JSON_INIT[..HEADER].to_vec();
        // A code object whose constants are a tuple in a tuple in ...
        let mut bomb = head.clone();
        bomb.push(b'c');
        bomb.extend_from_slice(&[0; 20]);
        bomb.extend_from_slice(&[b's', 0, 0, 0, 0]);
        bomb.extend(std::iter::repeat_n([b')', 1], 100_000).flatten());
        assert_eq!(read_pyc(&bomb), None);
        // A tuple claiming 4 billion items.
        head.extend_from_slice(&[
            b'c', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ]);
        head.extend_from_slice(&[b's', 0, 0, 0, 0, b'(', 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(read_pyc(&head), None);
        // A tuple of 100,000 references to one long string: read, with
        // the string kept for none of them.
        let mut refs = JSON_INIT[..HEADER].to_vec();
        refs.push(b'c');
        refs.extend_from_slice(&[0; 20]);
        refs.extend_from_slice(&[b's', 0, 0, 0, 0]);
        refs.extend_from_slice(&[b')', 1, b'a' | FLAG_REF]);
        refs.extend_from_slice(&2000u32.to_le_bytes());
        refs.extend(std::iter::repeat_n(b'x', 2000));
        refs.push(b'(');
        refs.extend_from_slice(&100_000u32.to_le_bytes());
        refs.extend(std::iter::repeat_n([b'r', 0, 0, 0, 0], 100_000).flatten());
        refs.extend_from_slice(&[b'N', b'N', b'z', 5]);
        refs.extend_from_slice(b"/a.py");
        let pyc = read_pyc(&refs).unwrap();
        assert_eq!((pyc.filename, pyc.imports), (b"/a.py".to_vec(), vec![]));
        // Not a pyc at all, or an unknown version.
        assert_eq!(
            read_pyc(b"\x7fELF\x02\x01\x01\x00 and so on and so forth"),
            None
        );
        let mut future = JSON_INIT.to_vec();
        future[..2].copy_from_slice(&3600u16.to_le_bytes());
        assert_eq!(read_pyc(&future), None);
    }
}
