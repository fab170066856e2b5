//! Enums whose values travel as fixed words (a verdict, a direction, an encryption): each word
//! is written once, where the enum is declared, and serde, `as_str`, `Display` and `FromStr` all
//! take it from there.

use std::{fmt, marker::PhantomData, str::FromStr};

/// Declares an enum whose variants are written on the wire as the given words, with `ALL` (in
/// declaration order), `as_str`, `Display`, `FromStr` (an unknown word is refused as "unknown
/// `$what` ...; use one of ..."), serde as the word, and comparison with a word.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident ($what:literal) {
            $( $(#[$vmeta:meta])* $variant:ident = $word:literal, )+
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        $vis enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: [Self; [$($word),+].len()] = [$(Self::$variant),+];

            /// Its word on the wire.
            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $word,)+
                }
            }
        }

        impl ::std::fmt::Display for $name {
            fn fmt(&self, f: &mut ::std::fmt::Formatter<'_>) -> ::std::fmt::Result {
                f.pad(self.as_str())
            }
        }

        impl ::std::str::FromStr for $name {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                Self::ALL.into_iter().find(|v| v.as_str() == s).ok_or_else(|| {
                    let known: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                    format!("unknown {} {s:?}; use one of {}", $what, known.join(", "))
                })
            }
        }

        /// Compares with a word as the wire writes it.
        impl PartialEq<&str> for $name {
            fn eq(&self, word: &&str) -> bool {
                self.as_str() == *word
            }
        }

        impl ::serde::Serialize for $name {
            fn serialize<S: ::serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> ::serde::Deserialize<'de> for $name {
            fn deserialize<D: ::serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str($crate::wire::Word::<Self>::new())
            }
        }
    };
}
pub(crate) use wire_enum;

/// Reads a word into an enum of [`wire_enum!`].
pub(crate) struct Word<T>(PhantomData<T>);

impl<T> Word<T> {
    pub(crate) fn new() -> Self {
        Self(PhantomData)
    }
}

impl<T: FromStr<Err = String>> serde::de::Visitor<'_> for Word<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("one of its words")
    }

    fn visit_str<E: serde::de::Error>(self, word: &str) -> Result<T, E> {
        word.parse().map_err(E::custom)
    }
}

#[cfg(test)]
mod tests {
    wire_enum! {
        /// A test vocabulary.
        enum Colour ("colour") {
            Red = "red",
            /// With a dash.
            DarkBlue = "dark-blue",
        }
    }

    #[test]
    fn one_word_each_way() {
        assert_eq!(Colour::ALL, [Colour::Red, Colour::DarkBlue]);
        for c in Colour::ALL {
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{c}\""));
            assert_eq!(serde_json::from_str::<Colour>(&json).unwrap(), c);
            assert_eq!(c.as_str().parse::<Colour>(), Ok(c));
        }
        assert_eq!(Colour::DarkBlue, "dark-blue");
        assert_eq!(
            format!("[{:<5}]", Colour::Red),
            "[red  ]",
            "padded as a str is"
        );
        assert_eq!(
            "blue".parse::<Colour>(),
            Err("unknown colour \"blue\"; use one of red, dark-blue".to_string())
        );
        assert!(serde_json::from_str::<Colour>("\"blue\"").is_err());
        assert!(serde_json::from_str::<Colour>("1").is_err());
    }
}
