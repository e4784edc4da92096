//! A small XML writer for EC2's responses: elements, escaped text, and
//! EC2's `<item>` lists.

/// EC2's response namespace.
pub const NAMESPACE: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

/// An XML document being written.
#[derive(Default)]
pub struct Xml {
    out: String,
}

fn escape(s: &str, out: &mut String) {
    // Most text (ids, names, states) needs no escaping: copy it whole.
    if !s
        .bytes()
        .any(|b| matches!(b, b'&' | b'<' | b'>' | b'"' | b'\'') || b < 0x20)
    {
        out.push_str(s);
        return;
    }
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Not allowed in XML 1.0 at all.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push_str("&#xFFFD;"),
            c => out.push(c),
        }
    }
}

impl Xml {
    /// `<{action}Response xmlns=…><requestId>…</requestId>`, closed by
    /// [`Xml::finish`].
    pub fn response(action: &str, request_id: &str) -> Self {
        let mut x = Xml {
            out: String::with_capacity(4096),
        };
        x.out
            .push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        x.out
            .push_str(&format!("<{action}Response xmlns=\"{NAMESPACE}\">"));
        x.leaf("requestId", request_id);
        x
    }

    /// The document, closing `<{action}Response>`.
    pub fn finish(mut self, action: &str) -> String {
        self.out.push_str(&format!("</{action}Response>"));
        self.out
    }

    /// The raw text written so far (for documents not opened by
    /// [`Xml::response`]).
    pub fn into_string(self) -> String {
        self.out
    }

    /// `<tag>`.
    pub fn open(&mut self, tag: &str) -> &mut Self {
        self.out.push('<');
        self.out.push_str(tag);
        self.out.push('>');
        self
    }

    /// `</tag>`.
    pub fn close(&mut self, tag: &str) -> &mut Self {
        self.out.push_str("</");
        self.out.push_str(tag);
        self.out.push('>');
        self
    }

    /// Escaped text.
    pub fn text(&mut self, text: &str) -> &mut Self {
        escape(text, &mut self.out);
        self
    }

    /// `<tag>text</tag>`.
    pub fn leaf(&mut self, tag: &str, text: &str) -> &mut Self {
        self.open(tag);
        escape(text, &mut self.out);
        self.close(tag)
    }

    /// [`Xml::leaf`] only for a non-empty `text`.
    pub fn opt(&mut self, tag: &str, text: &str) -> &mut Self {
        if !text.is_empty() {
            self.leaf(tag, text);
        }
        self
    }

    /// `<tag>` around `f`.
    pub fn wrap(&mut self, tag: &str, f: impl FnOnce(&mut Self)) -> &mut Self {
        self.open(tag);
        f(self);
        self.close(tag)
    }

    /// `<tag><item>…</item>…</tag>`, one item per element of `items`.
    pub fn items<T>(
        &mut self,
        tag: &str,
        items: impl IntoIterator<Item = T>,
        mut f: impl FnMut(&mut Self, T),
    ) -> &mut Self {
        self.open(tag);
        for i in items {
            self.open("item");
            f(self, i);
            self.close("item");
        }
        self.close(tag)
    }

    /// `<tagSet>` of key/value pairs.
    pub fn tag_set<'a>(&mut self, tags: impl IntoIterator<Item = (&'a str, &'a str)>) -> &mut Self {
        self.items("tagSet", tags, |x, (k, v)| {
            x.leaf("key", k).leaf("value", v);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_lists() {
        let mut x = Xml::response("DescribeThings", "req-1");
        x.items("thingSet", ["a<b", "c&d"], |x, t| {
            x.leaf("name", t);
        });
        x.leaf("bad", "x\u{1}y");
        let s = x.finish("DescribeThings");
        assert!(s.contains("<requestId>req-1</requestId>"));
        assert!(s.contains("<thingSet><item><name>a&lt;b</name></item><item><name>c&amp;d</name></item></thingSet>"));
        assert!(s.contains("<bad>x&#xFFFD;y</bad>"));
        assert!(s.ends_with("</DescribeThingsResponse>"));
    }
}
