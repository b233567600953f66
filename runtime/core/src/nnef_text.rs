//! A fast reader for the NNEF text of the load cache's archives.
//!
//! tract's NNEF parser (nom combinators with verbose errors, every operator precedence level
//! tried for every value) reads ~3 MB/s: 20-35 ms for the 93 KB `graph.nnef` of a 4-layer
//! decoder, the longest part of a cached load's reading. tract's writer emits a small part
//! of the NNEF grammar in the graph's body: assignments of invocations, identifiers,
//! literals, arrays and tuples. [`parse_document`] reads that part in one pass and builds
//! the same [`Document`]; on anything else (an operator, a subscript, a comprehension, an
//! identifier a literal could shadow) it hands the whole text to tract's parser, so what it
//! returns is always what tract's parser returns. The fragments before the graph are few
//! and short and are always read by tract's parser.

use tract_nnef::ast::{
    Argument, Assignment, Document, GraphDef, Identifier, Invocation, LValue, Literal, RValue,
    TypeName,
};
use tract_nnef::internal::TractResult;

/// Parses an NNEF document as `tract_nnef::ast::parse::parse_document` does.
pub fn parse_document(text: &str) -> TractResult<Document> {
    match parse_subset(text) {
        Some(doc) => Ok(doc),
        None => tract_nnef::ast::parse::parse_document(text),
    }
}

/// The document, if its graph's body keeps to the subset tract's writer emits (see the
/// module docs), else `None`.
pub fn parse_subset(text: &str) -> Option<Document> {
    Reader::new(text).document()
}

/// A cursor over the text; every method returns `None` where the text leaves the subset.
struct Reader<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Reader<'a> {
    fn new(text: &'a str) -> Self {
        Reader { text, at: 0 }
    }

    fn rest(&self) -> &'a str {
        &self.text[self.at..]
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    /// Skips spaces, tabs, line breaks and `#` comments.
    fn skip(&mut self) {
        let bytes = self.text.as_bytes();
        while let Some(&b) = bytes.get(self.at) {
            match b {
                b' ' | b'\t' | b'\n' | b'\r' => self.at += 1,
                b'#' => {
                    while bytes
                        .get(self.at)
                        .is_some_and(|&b| b != b'\n' && b != b'\r')
                    {
                        self.at += 1;
                    }
                }
                _ => break,
            }
        }
    }

    /// `token` after spaces, and the spaces after it.
    fn eat(&mut self, token: &str) -> bool {
        self.skip();
        if self.rest().starts_with(token) {
            self.at += token.len();
            self.skip();
            true
        } else {
            false
        }
    }

    fn expect(&mut self, token: &str) -> Option<()> {
        self.eat(token).then_some(())
    }

    fn document(&mut self) -> Option<Document> {
        self.expect("version")?;
        let version = self.number()?;
        self.expect(";")?;
        let mut extension = vec![];
        while self.eat("extension") {
            let id = self.identifier()?;
            self.skip();
            let end = self.rest().find(';')?;
            extension.push((id, self.rest()[..end].to_string()));
            self.at += end;
            self.expect(";")?;
        }
        let start = self.at;
        while self.rest().starts_with("fragment") {
            self.skip_fragment()?;
            self.skip();
        }
        let fragments = if self.at > start {
            tract_nnef::ast::parse::parse_fragments(&self.text[start..self.at]).ok()?
        } else {
            vec![]
        };
        self.expect("graph")?;
        let id = self.identifier()?;
        self.expect("(")?;
        let parameters = self.list(")", Self::identifier)?;
        self.expect("->")?;
        self.expect("(")?;
        let results = self.list(")", Self::identifier)?;
        self.expect("{")?;
        let mut body = vec![];
        while !self.eat("}") {
            body.push(self.assignment()?);
        }
        (self.at == self.text.len()).then_some(Document {
            version,
            extension,
            fragments,
            graph_def: GraphDef {
                id,
                parameters,
                results,
                body,
            },
        })
    }

    /// Moves past one fragment (declaration to its `;` or its body's `}`), strings and
    /// comments skipped whole.
    fn skip_fragment(&mut self) -> Option<()> {
        let bytes = self.text.as_bytes();
        let mut depth = 0usize;
        loop {
            let b = *bytes.get(self.at)?;
            match b {
                b'"' | b'\'' => {
                    self.string()?;
                    continue;
                }
                b'#' => {
                    self.skip();
                    continue;
                }
                b';' if depth == 0 => {
                    self.at += 1;
                    return Some(());
                }
                b'{' => depth += 1,
                b'}' => {
                    depth = depth.checked_sub(1)?;
                    if depth == 0 {
                        self.at += 1;
                        return Some(());
                    }
                }
                _ => {}
            }
            self.at += 1;
        }
    }

    /// Items separated by commas up to `close` (consumed); none is an empty list.
    fn list<T>(&mut self, close: &str, item: fn(&mut Self) -> Option<T>) -> Option<Vec<T>> {
        let mut items = vec![];
        if self.eat(close) {
            return Some(items);
        }
        loop {
            items.push(item(self)?);
            if self.eat(close) {
                return Some(items);
            }
            self.expect(",")?;
        }
    }

    /// A direct (`[A-Za-z_][A-Za-z0-9_]*`) or escaped (`i"..."`) identifier.
    fn identifier(&mut self) -> Option<Identifier> {
        self.skip();
        let rest = self.rest().as_bytes();
        if rest.len() > 1 && rest[0] == b'i' && (rest[1] == b'"' || rest[1] == b'\'') {
            self.at += 1;
            return self.string().map(Identifier);
        }
        let first = *rest.first()?;
        if !(first.is_ascii_alphabetic() || first == b'_') {
            return None;
        }
        let len = rest
            .iter()
            .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
            .unwrap_or(rest.len());
        let id = &self.rest()[..len];
        self.at += len;
        Some(Identifier(id.to_string()))
    }

    /// A quoted string; a backslash takes the next character as is.
    fn string(&mut self) -> Option<String> {
        let quote = self.peek()?;
        let mut out = String::new();
        let mut chars = self.rest()[1..].char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => out.push(chars.next()?.1),
                c if c as u32 == quote as u32 => {
                    self.at += 1 + i + 1;
                    return Some(out);
                }
                // The other quote ends tract's string too, unescaped: not the subset.
                '"' | '\'' => return None,
                c => out.push(c),
            }
        }
        None
    }

    /// `-?(digits|inf)(.digits*)?([eE][+-]?digits)?`, as written.
    fn number(&mut self) -> Option<String> {
        self.skip();
        let bytes = self.text.as_bytes();
        let start = self.at;
        let mut at = start;
        let digits = |at: usize| {
            bytes[at..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count()
        };
        if bytes.get(at) == Some(&b'-') {
            at += 1;
        }
        if bytes[at..].starts_with(b"inf") {
            at += 3;
        } else {
            let n = digits(at);
            if n == 0 {
                return None;
            }
            at += n;
        }
        if bytes.get(at) == Some(&b'.') {
            at += 1;
            at += digits(at);
        }
        if matches!(bytes.get(at), Some(b'e' | b'E')) {
            let mut exp = at + 1;
            if matches!(bytes.get(exp), Some(b'+' | b'-')) {
                exp += 1;
            }
            let n = digits(exp);
            if n > 0 {
                at = exp + n;
            }
        }
        self.at = at;
        Some(self.text[start..at].to_string())
    }

    fn assignment(&mut self) -> Option<Assignment> {
        let left = self.lvalue_list()?;
        self.expect("=")?;
        let right = self.rvalue()?;
        self.expect(";")?;
        Some(Assignment { left, right })
    }

    /// `a` or `a, b, ...` (a tuple), each an identifier, `[...]` or `(...)`.
    fn lvalue_list(&mut self) -> Option<LValue> {
        let mut items = vec![self.lvalue()?];
        while self.eat(",") {
            items.push(self.lvalue()?);
        }
        Some(if items.len() == 1 {
            items.remove(0)
        } else {
            LValue::Tuple(items)
        })
    }

    fn lvalue(&mut self) -> Option<LValue> {
        self.skip();
        for (open, close, array) in [("[", "]", true), ("(", ")", false)] {
            if self.eat(open) {
                let items = self.list(close, Self::lvalue)?;
                return Some(if array {
                    LValue::Array(items)
                } else {
                    LValue::Tuple(items)
                });
            }
        }
        let id = self.identifier()?;
        self.skip();
        Some(LValue::Identifier(id))
    }

    /// One value, which must end at `,`, `)`, `]` or `;` (else a comparison, a subscript or
    /// a conditional follows: not the subset).
    fn rvalue(&mut self) -> Option<RValue> {
        let value = self.sum()?;
        self.skip();
        matches!(self.peek(), Some(b',' | b')' | b']' | b';')).then_some(value)
    }

    /// Arithmetic (the writer spells symbolic dimensions so: `(sequence_length + 1)`), with
    /// tract's precedence levels, each folded from the left.
    fn sum(&mut self) -> Option<RValue> {
        self.binary(b"+-", Self::product)
    }

    fn product(&mut self) -> Option<RValue> {
        self.binary(b"*/", Self::power)
    }

    fn power(&mut self) -> Option<RValue> {
        self.binary(b"^", Self::atom)
    }

    fn binary(&mut self, ops: &[u8], operand: fn(&mut Self) -> Option<RValue>) -> Option<RValue> {
        let mut left = operand(self)?;
        loop {
            self.skip();
            match self.peek() {
                Some(op) if ops.contains(&op) => {
                    self.at += 1;
                    let right = operand(self)?;
                    left =
                        RValue::Binary(Box::new(left), (op as char).to_string(), Box::new(right));
                }
                _ => return Some(left),
            }
        }
    }

    fn atom(&mut self) -> Option<RValue> {
        self.skip();
        let b = self.peek()?;
        if b == b'[' || b == b'(' {
            let close = if b == b'[' { "]" } else { ")" };
            self.at += 1;
            self.skip();
            // `[for ...]` is a comprehension.
            if b == b'['
                && self.rest().starts_with("for")
                && !self
                    .rest()
                    .as_bytes()
                    .get(3)
                    .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_')
            {
                return None;
            }
            let mut items = self.list(close, Self::rvalue)?;
            return Some(if b == b'[' {
                RValue::Array(items)
            } else if items.len() == 1 {
                items.remove(0)
            } else {
                RValue::Tuple(items)
            });
        }
        if b == b'"' || b == b'\'' {
            return self.string().map(|s| RValue::Literal(Literal::String(s)));
        }
        if b.is_ascii_digit() || b == b'-' {
            return self.number().map(|n| RValue::Literal(Literal::Numeric(n)));
        }
        let escaped = self.rest().starts_with("i\"") || self.rest().starts_with("i'");
        let id = self.identifier()?;
        self.skip();
        match self.peek() {
            Some(b'(') => {
                self.at += 1;
                self.invocation(id, None)
            }
            Some(b'<') => {
                self.at += 1;
                let generic = self.type_name()?;
                self.expect(">")?;
                self.expect("(")?;
                self.invocation(id, Some(generic))
            }
            _ if escaped => Some(RValue::Identifier(id)),
            // tract tries literals before identifiers: these words are literals, and an
            // identifier they begin is a literal and a leftover to tract.
            _ => match id.0.as_str() {
                "true" => Some(RValue::Literal(Literal::Logical(true))),
                "false" => Some(RValue::Literal(Literal::Logical(false))),
                "inf" => Some(RValue::Literal(Literal::Numeric(id.0))),
                w if ["true", "false", "inf"].iter().any(|l| w.starts_with(l)) => None,
                "for" | "if" | "else" | "yield" | "in" => None,
                _ => Some(RValue::Identifier(id)),
            },
        }
    }

    fn type_name(&mut self) -> Option<TypeName> {
        self.skip();
        let name = [
            ("integer", TypeName::Integer),
            ("scalar", TypeName::Scalar),
            ("logical", TypeName::Logical),
            ("string", TypeName::String),
            ("?", TypeName::Any),
        ]
        .into_iter()
        .find(|(word, _)| self.rest().starts_with(word));
        let (word, name) = name?;
        self.at += word.len();
        Some(name)
    }

    /// The arguments after `id(`, to the closing parenthesis.
    fn invocation(&mut self, id: Identifier, generic: Option<TypeName>) -> Option<RValue> {
        let arguments = self.list(")", Self::argument)?;
        Some(RValue::Invocation(Invocation {
            id,
            generic_type_name: generic,
            arguments,
        }))
    }

    /// `name = value` or `value`.
    fn argument(&mut self) -> Option<Argument> {
        self.skip();
        let start = self.at;
        if let Some(id) = self.identifier() {
            self.skip();
            if self.rest().starts_with('=') && !self.rest().starts_with("==") {
                self.at += 1;
                let rvalue = self.rvalue()?;
                return Some(Argument {
                    id: Some(id),
                    rvalue,
                });
            }
        }
        self.at = start;
        Some(Argument {
            id: None,
            rvalue: self.rvalue()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reader gives tract's document, or leaves it to tract.
    fn same(text: &str, read: bool) {
        let tract = tract_nnef::ast::parse::parse_document(text).unwrap();
        let ours = parse_subset(text);
        assert_eq!(ours.is_some(), read, "{text}");
        assert_eq!(parse_document(text).unwrap(), tract);
        if let Some(ours) = ours {
            assert_eq!(ours, tract);
        }
    }

    const HEAD: &str = "version 1.0;\n\nextension tract_registry edgevlm;\n\
        extension tract_symbol 🎯0;\n\nfragment tract_core_properties(\n) -> (properties: \
        (string, tensor<scalar>)[])\n{\n  properties = [(\"a;}\", tract_core_cast(9, to = \
        \"i64\"))];\n}\n\n";

    fn graph(body: &str) -> String {
        format!("{HEAD}graph network(x, i\"y.0\") -> (z, w) {{\n{body}\n}}\n")
    }

    #[test]
    fn reads_what_tracts_writer_writes() {
        same(
            &graph(
                "  x = tract_core_external(shape = [batch, 4, 768], datum_type = \"F32\");\n\
                 # a comment\n\
                 v = variable<scalar>(label = \"a/b.c\", shape = [1, 1, 768]);\n\
                 c = [[[[[0.125]]]]];\n\
                 d = [-1e-5, 2.5E+3, 7., -inf, 0];\n\
                 ( q, s ) = edgevlm_dq(x, flag = true, other = false, s = 'it\\'s');\n\
                 z = edgevlm_einsum([x, v, i\"past.0\"], expr = \"amk,kn->amn\", t = (1, [2]), e = []);\n\
                 [a, b] = f();\n\
                 w = g( x ,y = (x) );\n\
                 e = (sequence_length + past_sequence_length) * 2 - a / b ^ 2 ^ c + (1-2) + -1;\n\
                 l = h(true, a = false, b = inf, c = i\"true\", d = [format, trueth(1)]);",
            ),
            true,
        );
        same(&graph(""), true);
    }

    #[test]
    fn leaves_the_rest_of_nnef_to_tract() {
        for body in [
            "z = x < 1;",
            "z = x * -y;",
            "z = x[0];",
            "z = a if c else b;",
            "z = -x;",
            "z = f(a < b, c >= 1);",
            "z = [for i in [1, 2] yield i];",
        ] {
            same(&graph(body), false);
        }
        // No fragments.
        same("version 1.0;\ngraph g(x) -> (y) {\n  y = f(x);\n}\n", true);
    }
}
