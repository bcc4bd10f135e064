# frozen_string_literal: true

require "json"
require_relative "json/encoder"
require_relative "json/decoder"
require_relative "json/well_known"

module Flowctl
  # DecodeError#path: where in a JSON document the problem is (`metrics.values["x"]`,
  # `events[2].type`); nil for the binary format and for text that is not JSON at all.
  class DecodeError
    attr_reader :path
  end

  # The proto3 JSON mapping (https://protobuf.dev/programming-guides/proto3/#json) for
  # every message class, written to print what google-protobuf 3.21 (upb) prints:
  #
  #   msg.to_json                       # '{"processorId":"p1","metrics":{"cpu":0.5}}'
  #   Klass.encode_json(msg)            # the same
  #   Klass.decode_json(str)            # -> message; Flowctl::DecodeError naming the field
  #   JSON.generate(msg), JSON.pretty_generate([msg])
  #
  # Printing: fields in declaration order under their json_name (lowerCamelCase); fields
  # at their default left out (proto3 `optional`, oneof members and messages printed when
  # set); 64-bit integers as strings; enums by name (an
  # unknown number as a number); bytes in base64; Timestamps in RFC 3339 with 0, 3, 6 or
  # 9 fractional digits; doubles as upb prints them (shortest of %.15g/%.17g that reads
  # back; floats %.6g/%.9g); NaN and infinities as "NaN", "Infinity", "-Infinity"; map
  # entries in the order upb prints a map built by inserting them in the Hash's order
  # (its hash table's: json_order.c), which is the map google-protobuf decodes from
  # msg.to_proto or builds from the same Hash; the well-known types in their own forms
  # (json/well_known.rb).
  #
  # Reading accepts both lowerCamelCase and .proto names, numbers as numbers or strings,
  # enums by name or number, null as "the default", base64 standard or URL-safe with or
  # without padding, RFC 3339 with any offset. Unknown fields raise unless
  # ignore_unknown_fields: true (which also drops unknown enum names).
  module ProtoJSON
    INT_RANGES = {
      int32: -2**31..2**31 - 1, sint32: -2**31..2**31 - 1, sfixed32: -2**31..2**31 - 1,
      uint32: 0..2**32 - 1, fixed32: 0..2**32 - 1,
      int64: -2**63..2**63 - 1, sint64: -2**63..2**63 - 1, sfixed64: -2**63..2**63 - 1,
      uint64: 0..2**64 - 1, fixed64: 0..2**64 - 1
    }.freeze
    QUOTED_INTS = %i[int64 sint64 sfixed64 uint64 fixed64].freeze
    # google.protobuf.Timestamp: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z
    TIMESTAMP_SECONDS = -62_135_596_800..253_402_300_799
    ESCAPES = { '"' => '\\"', "\\" => "\\\\", "\n" => "\\n", "\r" => "\\r", "\t" => "\\t", "\f" => "\\f",
                "\b" => "\\b" }.tap { |h| (0..31).each { |c| h[c.chr] ||= format("\\u%04x", c) } }.freeze
    ESCAPE_RE = /["\\\x00-\x1f]/
    INT_STRING = /\A-?(?:0|[1-9][0-9]*)\z/
    NUMBER_STRING = /\A-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?\z/
    BASE64 = %r{\A[A-Za-z0-9+/\-_]*\z}
    RFC3339 = /\A(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:(Z)|([+-])(\d{2}):(\d{2}))\z/
    DAYS = [0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31].freeze
    MAX_NESTING = 100
    # The smallest double that a float cannot hold: FLT_MAX (2^128 - 2^104) plus half its
    # unit in the last place; below it a double rounds to a finite float.
    FLOAT_LIMIT = 2.0**128 - 2.0**103
    # (an exponent's "-0", as in 1e-0, is not a number of its own)
    NEGATIVE_ZERO = /"(?:[^"\\]|\\.)*"|(?<![eE])-0(?![.0-9eE])/n

    module_function

    # ---- printing ------------------------------------------------------------------

    # The JSON text of a message (options as google-protobuf's encode_json:
    # emit_defaults:, preserve_proto_fieldnames:, format_enums_as_integers:).
    #
    # The text comes from C (ext/flowctl/json_write.c) when it can print the message;
    # the Ruby encoder prints the rest (the well-known types with a form of their own)
    # and names what is wrong in a message that cannot be printed.
    def encode(msg, options = NO_OPTIONS)
      flags = 0
      flags = Encoder.flags(options = Encoder.options(options)) unless options.equal?(NO_OPTIONS)
      out = Native.json_encode(msg, flags)
      while out.is_a?(Class)
        plan(out)
        out = Native.json_encode(msg, flags)
      end
      out || Encoder.new(options).encode(msg)
    end

    NO_OPTIONS = {}.freeze

    # Gives the C printer a class's JSON names, in declaration order (once per class).
    def plan(klass)
      desc = klass.descriptor
      Native.json_plan(klass, WELL_KNOWN.key?(desc.name), desc.fields.map { |f| [f.name, f.json_name] })
    end

    # The entries of a map in the order google-protobuf prints them: the order of its
    # hash table (ext/flowctl/json_order.c) after inserting them in the order given.
    # entries: [[key bytes, ...], ...] (String keys' bytes; integers packed in native
    # order at their C size, booleans as one byte).
    def upb_order(entries)
      return entries if entries.size < 2

      Native.json_map_order(entries.map(&:first)).map { |i| entries[i] }
    end

    # What is wrong with one value, raised inside the encoder or decoder and passed up
    # through the fields it is in, each adding its name: the path is only put together
    # when something is wrong. Never leaves ProtoJSON.
    class Problem < StandardError
      attr_reader :error_class, :text

      def initialize(error_class, text)
        @error_class = error_class
        @text = text
        @segments = []
        super(text)
      end

      # Prepends a field name (Symbol) or a "[index]" / "[\"key\"]" (String).
      def at(segment)
        @segments.unshift(segment)
        self
      end

      # metrics["x"], component.type, events[2].id; nil at the top level.
      def path
        return nil if @segments.empty?

        @segments.each_with_object(+"") do |s, out|
          out << "." if s.is_a?(Symbol) && !out.empty?
          out << s.to_s
        end
      end
    end

    # A JSON string with upb's escapes (\uXXXX in lower case for the other controls).
    def string(s, out)
      out << '"' << (s.match?(ESCAPE_RE) ? s.gsub(ESCAPE_RE, ESCAPES) : s) << '"'
    end

    def special_float(d)
      return '"NaN"' if d.nan?
      return d.positive? ? '"Infinity"' : '"-Infinity"' if d.infinite?

      nil
    end

    # upb's round-trip printing: %.15g, or %.17g when that does not read back.
    def double(d)
      special_float(d) || begin
        s = format("%.15g", d)
        s.to_f == d ? s : format("%.17g", d)
      end
    end

    # A float field's value (a double holding a float): %.6g, or %.9g when that does not
    # read back as the same float.
    def float(d)
      special_float(d) || begin
        s = format("%.6g", d)
        [s.to_f].pack("e").unpack1("e") == d ? s : format("%.9g", d)
      end
    end

    # RFC 3339 in UTC with 0, 3, 6 or 9 fractional digits, as upb prints a Timestamp;
    # nil outside years 1 to 9999.
    def timestamp(t)
      sec = t.to_i
      return nil unless TIMESTAMP_SECONDS.cover?(sec)

      Time.at(sec).utc.strftime("%Y-%m-%dT%H:%M:%S") << fraction(t.nsec) << "Z"
    end

    # Nanoseconds as upb prints them: nothing, or 3, 6 or 9 digits after a dot.
    def fraction(ns)
      if ns.zero? then ""
      elsif (ns % 1_000_000).zero? then format(".%03d", ns / 1_000_000)
      elsif (ns % 1000).zero? then format(".%06d", ns / 1000)
      else format(".%09d", ns)
      end
    end

    # ---- reading -------------------------------------------------------------------

    # A message of klass from JSON text.
    #
    # Plain well-formed text is read in C (ext/flowctl/json_read.c) to the same message;
    # the Ruby decoder reads the rest and names what is wrong.
    def decode(klass, text, ignore_unknown_fields: false)
      raise TypeError, "#{klass}.decode_json takes a String (given #{text.class})" unless text.is_a?(String)

      out = Native.json_decode(klass, text)
      while out.is_a?(Class)
        plan(out)
        out = Native.json_decode(klass, text)
      end
      out || ruby_decode(klass, text, ignore_unknown_fields)
    end

    # The Ruby decoder alone (what the C reader falls back to; the specs compare both).
    def ruby_decode(klass, text, ignore_unknown_fields = false)
      Decoder.new(klass, ignore_unknown_fields).decode(parse(klass, text))
    end

    def parse(klass, text)
      ::JSON.parse(guard(keep_negative_zero(text)), allow_nan: false, max_nesting: MAX_NESTING, create_additions: false,
                                                decimal_class: nil, object_class: JSONObject)
    rescue ::JSON::ParserError, EncodingError, ArgumentError => e
      raise DecodeError, "invalid JSON for #{klass.descriptor_name}: #{e.message[0, 200]}"
    end

    # A JSON object as parsed: a Hash that remembers the keys it was given twice (a
    # plain Hash would keep the last value silently; the decoder refuses them, naming
    # the field, as protobuf-go does; upb appended to a list given twice).
    class JSONObject < Hash
      attr_reader :twice

      def []=(key, value)
        (@twice ||= []) << key if key?(key)
        super
      end
    end

    # json 2.6's parser quotes a bare Infinity or NaN it refuses from 7 (NaN: 2) bytes
    # before where it stands: near the start of a text that reads before the String's
    # buffer (found by fuzz/json_target.c under ASan). Leading spaces keep it inside.
    def guard(text)
      text.include?("Infinity") || text.include?("NaN") ? "        #{text}" : text
    end

    # JSON.parse reads the number -0 as the Integer 0: outside strings and exponents it is
    # made -0.0, so that a double field keeps its sign (an integer field reads 0 either way).
    def keep_negative_zero(text)
      return text unless text.include?("-0")

      text.b.gsub(NEGATIVE_ZERO) { |t| t == "-0" ? "-0.0" : t }.force_encoding(text.encoding)
    end

  end

  class Message
    # call-seq: Klass.encode_json(msg, options = {}) -> String
    #
    # The proto3 JSON of msg, as google-protobuf prints it. Options: emit_defaults: (print
    # fields at their default too), preserve_proto_fieldnames: (.proto names instead of
    # lowerCamelCase), format_enums_as_integers:.
    def self.encode_json(msg, options = ProtoJSON::NO_OPTIONS)
      raise TypeError, "#{self}.encode_json needs a #{self} (given #{msg.class})" unless msg.is_a?(self)

      ProtoJSON.encode(msg, options)
    end

    # call-seq: Klass.decode_json(str, ignore_unknown_fields: false) -> message
    #
    # Flowctl::DecodeError (with #path) when str is not JSON for this message.
    def self.decode_json(str, ignore_unknown_fields: false)
      ProtoJSON.decode(self, str, ignore_unknown_fields: ignore_unknown_fields)
    end

    # call-seq:
    #   msg.to_json                 -> String (proto3 JSON)
    #   msg.to_json(options_hash)   -> String (encode_json's options)
    #   msg.to_json(json_state)     -> what JSON.generate / JSON.pretty_generate write for msg
    def to_json(*args)
      if args.empty? # the common call: straight to the C printer
        text = Native.json_encode(self, 0)
        return text if text.is_a?(String)
      end
      state = args.first
      return ProtoJSON.encode(self, state || ProtoJSON::NO_OPTIONS) if state.nil? || state.is_a?(Hash)

      text = ProtoJSON.encode(self, ProtoJSON::NO_OPTIONS)
      # JSON.generate's default (compact) state writes the text as it is; another layout
      # (pretty_generate) re-generates it from its parsed form.
      return text unless state.respond_to?(:indent) && !(state.indent.empty? && state.space.empty? && state.object_nl.empty?)

      ::JSON.parse(text).to_json(state)
    end
  end
end
