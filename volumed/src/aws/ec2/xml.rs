//! The XML EC2 answers with: `<{Action}Response xmlns=EC2's namespace>`
//! holding `requestId` and the action's elements, and the error document
//! `<Response><Errors><Error><Code/><Message/></Error></Errors><RequestID/></Response>`.
//! Text is escaped here, once, so no value can break the document.

pub const NAMESPACE: &str = "http://ec2.amazonaws.com/doc/2016-11-15/";

pub struct Xml {
    out: String,
}

impl Xml {
    /// Starts `<{action}Response>` with its request id.
    pub fn response(action: &str, request_id: &str) -> Xml {
        let mut x = Xml {
            out: String::with_capacity(1024),
        };
        x.out
            .push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        x.out
            .push_str(&format!("<{action}Response xmlns=\"{NAMESPACE}\">"));
        x.elem("requestId", request_id);
        x
    }

    pub fn open(&mut self, tag: &str) -> &mut Self {
        self.out.push('<');
        self.out.push_str(tag);
        self.out.push('>');
        self
    }

    pub fn close(&mut self, tag: &str) -> &mut Self {
        self.out.push_str("</");
        self.out.push_str(tag);
        self.out.push('>');
        self
    }

    /// Takes back the closing tag just written, so the element goes on.
    pub fn reopen(&mut self, tag: &str) -> &mut Self {
        let end = format!("</{tag}>");
        if self.out.ends_with(&end) {
            self.out.truncate(self.out.len() - end.len());
        } else {
            self.open(tag);
        }
        self
    }

    pub fn elem(&mut self, tag: &str, text: impl std::fmt::Display) -> &mut Self {
        self.open(tag);
        escape_into(&mut self.out, &text.to_string());
        self.close(tag)
    }

    /// An element only when there is a value.
    pub fn opt(&mut self, tag: &str, text: Option<impl std::fmt::Display>) -> &mut Self {
        if let Some(t) = text {
            self.elem(tag, t);
        }
        self
    }

    /// `<tagSet><item><key/><value/></item>...</tagSet>`.
    pub fn tag_set<'a>(
        &mut self,
        tags: impl IntoIterator<Item = (&'a String, &'a String)>,
    ) -> &mut Self {
        self.open("tagSet");
        for (k, v) in tags {
            self.open("item")
                .elem("key", k)
                .elem("value", v)
                .close("item");
        }
        self.close("tagSet")
    }

    pub fn finish(mut self, action: &str) -> String {
        self.close(&format!("{action}Response"));
        self.out
    }
}

/// EC2's error document.
pub fn error(code: &str, message: &str, request_id: &str) -> String {
    let mut out = String::with_capacity(256);
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Response><Errors><Error><Code>");
    escape_into(&mut out, code);
    out.push_str("</Code><Message>");
    escape_into(&mut out, message);
    out.push_str("</Message></Error></Errors><RequestID>");
    escape_into(&mut out, request_id);
    out.push_str("</RequestID></Response>");
    out
}

fn escape_into(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Not representable in XML 1.0; tags and names exclude them,
            // but a message may quote input.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => out.push('?'),
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documents() {
        let mut x = Xml::response("DeleteVolume", "r-1");
        x.elem("return", true);
        assert_eq!(
            x.finish("DeleteVolume"),
            format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<DeleteVolumeResponse xmlns=\"{NAMESPACE}\"><requestId>r-1</requestId><return>true</return></DeleteVolumeResponse>"
            )
        );
        let e = error("InvalidVolume.NotFound", "a <b> & 'c'\u{1}", "r");
        assert!(e.contains("<Code>InvalidVolume.NotFound</Code><Message>a &lt;b&gt; &amp; &apos;c&apos;?</Message>"), "{e}");
    }
}
