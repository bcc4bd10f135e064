# frozen_string_literal: true

require "json"

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
  # Printing: lowerCamelCase names; fields at their default left out (proto3 `optional`
  # and message fields printed when set); 64-bit integers as strings; enums by name (an
  # unknown number as a number); bytes in base64; Timestamps in RFC 3339 with 0, 3, 6 or
  # 9 fractional digits; doubles as upb prints them (shortest of %.15g/%.17g that reads
  # back; floats %.6g/%.9g); NaN and infinities as "NaN", "Infinity", "-Infinity"; map
  # entries in the order of the Hash (upb prints them in its hash table's order).
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
    NEGATIVE_ZERO = /"(?:[^"\\]|\\.)*"|-0(?![.0-9eE])/n

    module_function

    # ---- printing ------------------------------------------------------------------

    # The JSON text of a message (options as google-protobuf's encode_json:
    # emit_defaults:, preserve_proto_fieldnames:, format_enums_as_integers:).
    def encode(msg, options = {})
      opts = Encoder.options(options)
      out = +""
      Encoder.new(opts).message(msg, msg.class.descriptor, out, nil)
      out.force_encoding(Encoding::UTF_8)
    end

    # Writes proto3 JSON into a String; raises TypeError/ArgumentError/RangeError naming
    # the field when a map or list was filled in place with a value its field cannot hold.
    class Encoder
      OPTIONS = %i[emit_defaults preserve_proto_fieldnames format_enums_as_integers].freeze

      def self.options(options)
        options = {} if options.nil?
        raise TypeError, "JSON options must be a Hash (given #{options.class})" unless options.is_a?(Hash)

        unknown = options.keys - OPTIONS
        raise ArgumentError, "unknown JSON option #{unknown.first.inspect} (options: #{OPTIONS.join(', ')})" if unknown.any?

        options
      end

      def initialize(opts)
        @defaults = opts[:emit_defaults] ? true : false
        @proto_names = opts[:preserve_proto_fieldnames] ? true : false
        @enum_ints = opts[:format_enums_as_integers] ? true : false
      end

      def message(msg, desc, out, path)
        out << "{"
        first = true
        desc.fields.each do |f|
          v = msg[f.name]
          next unless present?(f, v)

          out << "," unless first
          first = false
          out << '"' << (@proto_names ? f.name.to_s : f.json_name) << '":'
          field(f, v, out, path)
        end
        out << "}"
      end

      private

      # What upb prints: set fields with presence; others unless at their default
      # (-0.0 is not the default: its bits differ).
      def present?(f, v)
        return !v.nil? if f.has_presence?
        return @defaults || !v.empty? unless f.label == :singular
        return true if @defaults

        case v
        when Float then !v.zero? || (1.0 / v).negative?
        when Integer then !v.zero?
        when String then !v.empty?
        when Symbol then f.enum_values[v] != 0
        else v != false && !v.nil?
        end
      end

      def field(f, v, out, path)
        path = join(path, f.name)
        case f.label
        when :singular then value(f, v, out, path)
        when :repeated then list(f, v, out, path)
        else map(f, v, out, path)
        end
      end

      def list(f, v, out, path)
        raise TypeError, "#{path}: repeated field holds a #{v.class}, not an Array" unless v.is_a?(Array)

        out << "["
        v.each_with_index do |e, i|
          out << "," if i.positive?
          value(f, e, out, "#{path}[#{i}]")
        end
        out << "]"
      end

      def map(f, v, out, path)
        raise TypeError, "#{path}: map field holds a #{v.class}, not a Hash" unless v.is_a?(Hash)

        out << "{"
        first = true
        v.each do |k, e|
          out << "," unless first
          first = false
          key = map_key(f, k, path)
          ProtoJSON.string(key, out)
          out << ":"
          value(f, e, out, "#{path}[#{key.inspect}]")
        end
        out << "}"
      end

      def map_key(f, k, path)
        case f.key_type
        when :string then utf8(k, "#{path} (a key)")
        when :bool
          raise TypeError, "#{path}: map key must be true or false (given #{k.class})" unless [true, false].include?(k)

          k.to_s
        else integer(f.key_type, k, "#{path} (a key)").to_s
        end
      end

      def value(f, v, out, path)
        case f.type
        when :string then ProtoJSON.string(utf8(v, path), out)
        when :bytes
          raise TypeError, "#{path}: expected a String for bytes (given #{v.class})" unless v.is_a?(String)

          out << '"' << [v].pack("m0") << '"'
        when :bool
          raise TypeError, "#{path}: expected true or false (given #{v.class})" unless [true, false].include?(v)

          out << (v ? "true" : "false")
        when :double then out << ProtoJSON.double(number(v, path))
        when :float then out << ProtoJSON.float(number(v, path))
        when :enum then enum(f, v, out, path)
        when :message then submessage(f, v, out, path)
        else
          i = integer(f.type, v, path)
          QUOTED_INTS.include?(f.type) ? (out << '"' << i.to_s << '"') : (out << i.to_s)
        end
      end

      def submessage(f, v, out, path)
        if f.timestamp?
          out << '"' << ProtoJSON.timestamp(v, path) << '"'
        elsif v.is_a?(f.message_class || NilClass) && !v.nil?
          message(v, v.class.descriptor, out, path)
        else
          raise TypeError, "#{path}: expected #{f.message_class || f.type_name} (given #{v.class})"
        end
      end

      def enum(f, v, out, path)
        number = v.is_a?(Integer) ? v : f.enum_values[v.is_a?(String) ? v.to_sym : v]
        raise ArgumentError, "#{path}: #{v.inspect} is not a value of #{f.type_name}" if number.nil?

        integer(:int32, number, path)
        name = @enum_ints ? nil : f.enum_values.key(number)
        name ? (out << '"' << name.to_s << '"') : (out << number.to_s)
      end

      def utf8(v, path)
        raise TypeError, "#{path}: expected a String (given #{v.class})" unless v.is_a?(String)
        return v if v.encoding == Encoding::UTF_8 && v.valid_encoding?

        s = v.encoding == Encoding::BINARY || v.encoding == Encoding::US_ASCII ? v.dup.force_encoding(Encoding::UTF_8) : v.encode(Encoding::UTF_8)
        raise ArgumentError, "#{path}: invalid UTF-8 in a string" unless s.valid_encoding?

        s
      rescue EncodingError => e
        raise ArgumentError, "#{path}: cannot convert #{v.encoding} to UTF-8 (#{e.message})"
      end

      def integer(type, v, path)
        raise TypeError, "#{path}: expected an Integer (given #{v.class})" unless v.is_a?(Integer)
        raise RangeError, "#{path}: #{v} is out of range for #{type}" unless INT_RANGES[type].cover?(v)

        v
      end

      def number(v, path)
        return v if v.is_a?(Float)
        return v.to_f if v.is_a?(Integer)

        raise TypeError, "#{path}: expected a Float (given #{v.class})"
      end

      def join(path, name) = path ? "#{path}.#{name}" : name.to_s
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

    def timestamp(t, path)
      raise TypeError, "#{path}: expected a Time (given #{t.class})" unless t.is_a?(Time)

      sec = t.to_i
      raise RangeError, "#{path}: #{t.inspect} is outside what google.protobuf.Timestamp holds (years 1 to 9999)" unless TIMESTAMP_SECONDS.cover?(sec)

      s = Time.at(sec).utc.strftime("%Y-%m-%dT%H:%M:%S")
      ns = t.nsec
      if ns.zero? then s << "Z"
      elsif (ns % 1_000_000).zero? then s << format(".%03dZ", ns / 1_000_000)
      elsif (ns % 1000).zero? then s << format(".%06dZ", ns / 1000)
      else s << format(".%09dZ", ns)
      end
    end

    # ---- reading -------------------------------------------------------------------

    # A message of klass from JSON text.
    def decode(klass, text, ignore_unknown_fields: false)
      raise TypeError, "#{klass}.decode_json takes a String (given #{text.class})" unless text.is_a?(String)

      tree = parse(klass, text)
      Decoder.new(klass, ignore_unknown_fields).message(klass, tree, nil)
    end

    def parse(klass, text)
      ::JSON.parse(keep_negative_zero(text), allow_nan: false, max_nesting: MAX_NESTING, create_additions: false,
                                                decimal_class: nil)
    rescue ::JSON::ParserError, EncodingError, ArgumentError => e
      raise DecodeError, "invalid JSON for #{klass.descriptor_name}: #{e.message[0, 200]}"
    end

    # JSON.parse reads the number -0 as the Integer 0: outside strings it is made -0.0,
    # so that a double field keeps its sign (an integer field reads 0 either way).
    def keep_negative_zero(text)
      return text unless text.include?("-0")

      text.b.gsub(NEGATIVE_ZERO) { |t| t == "-0" ? "-0.0" : t }.force_encoding(text.encoding)
    end

    # Reads a parsed JSON document (Hashes, Arrays, ...) into messages.
    class Decoder
      def initialize(klass, ignore_unknown)
        @root = klass
        @ignore_unknown = ignore_unknown ? true : false
      end

      def message(klass, tree, path)
        fail!(path, "expected an object for #{klass.descriptor_name}, got #{what(tree)}") unless tree.is_a?(Hash)

        desc = klass.descriptor
        msg = klass.new
        seen = nil
        tree.each do |key, v|
          f = desc.field(key)
          if f.nil?
            next if @ignore_unknown

            fail!(path, "unknown field #{key.inspect} for #{klass.descriptor_name} " \
                        "(fields: #{desc.fields.map(&:json_name).join(', ')})")
          end
          fpath = path ? "#{path}.#{f.name}" : f.name.to_s
          seen ||= {}
          fail!(fpath, "field given twice (#{seen[f]} and #{key.inspect})") if seen[f]
          seen[f] = key.inspect
          next if v.nil?

          oneof_once(seen, f, key, fpath) if f.oneof

          v = field(f, v, fpath)
          set(msg, f, v, fpath) unless v.equal?(SKIP)
        end
        msg
      end

      private

      SKIP = Object.new.freeze # an unknown enum name when unknown names are ignored

      # At most one member of a oneof (null aside), as upb reads it.
      def oneof_once(seen, f, key, path)
        other = seen[f.oneof]
        fail!(path, "#{other} and #{key.inspect} are members of one oneof: give one of them") if other
        seen[f.oneof] = key.inspect
      end

      def set(msg, f, v, path)
        msg[f.name] = v
      rescue TypeError, ArgumentError, RangeError => e
        fail!(path, e.message)
      end

      def field(f, v, path)
        case f.label
        when :singular then value(f, v, path)
        when :repeated
          fail!(path, "expected an array, got #{what(v)}") unless v.is_a?(Array)

          out = []
          v.each_with_index do |e, i|
            e = value(f, e, "#{path}[#{i}]", element: true)
            out << e unless e.equal?(SKIP)
          end
          out
        else map(f, v, path)
        end
      end

      def map(f, v, path)
        fail!(path, "expected an object, got #{what(v)}") unless v.is_a?(Hash)

        out = {}
        v.each do |k, e|
          epath = "#{path}[#{k.inspect}]"
          e = value(f, e, epath, element: true)
          out[key(f, k, epath)] = e unless e.equal?(SKIP)
        end
        out
      end

      def key(f, k, path)
        fail!(path, "invalid UTF-8 in a map key") unless k.valid_encoding?

        case f.key_type
        when :string then utf8(k, path)
        when :bool
          fail!(path, "map key must be \"true\" or \"false\"") unless %w[true false].include?(k)
          k == "true"
        else
          fail!(path, "map key must be an integer") unless k.match?(INT_STRING)
          range(f.key_type, Integer(k, 10), path)
        end
      end

      def value(f, v, path, element: false)
        fail!(path, "null is not allowed in a #{f.label == :map ? 'map' : 'list'}") if v.nil? && element
        fail!(path, "invalid UTF-8 in a string") if v.is_a?(String) && !v.valid_encoding?

        case f.type
        when :string then utf8(v, path)
        when :bytes then bytes(v, path)
        when :bool
          fail!(path, "expected true or false, got #{what(v)}") unless v == true || v == false
          v
        when :double, :float then float(f.type, v, path)
        when :enum then enum(f, v, path)
        when :message
          if f.timestamp? then timestamp(v, path)
          elsif f.message_class then message(f.message_class, v, path)
          else fail!(path, "no message class for #{f.type_name}")
          end
        else integer(f.type, v, path)
        end
      end

      def utf8(v, path)
        fail!(path, "expected a string, got #{what(v)}") unless v.is_a?(String)
        fail!(path, "invalid UTF-8 in a string") unless v.valid_encoding?

        v
      end

      def integer(type, v, path)
        n = case v
            when Integer then v
            when Float
              fail!(path, "#{v} is not an integer") unless v.finite? && v == v.floor
              v.to_i
            when String
              if v.match?(INT_STRING) then Integer(v, 10)
              elsif v.match?(NUMBER_STRING) then integer(type, Float(v), path)
              else fail!(path, "expected an integer, got #{what(v)}")
              end
            else fail!(path, "expected an integer, got #{what(v)}")
            end
        range(type, n, path)
      end

      def range(type, n, path)
        fail!(path, "#{n} is out of range for #{type}") unless INT_RANGES[type].cover?(n)
        n
      end

      def float(type, v, path)
        d = case v
            when Integer, Float then v.to_f
            when "NaN" then return Float::NAN
            when "Infinity" then return Float::INFINITY
            when "-Infinity" then return -Float::INFINITY
            when String
              fail!(path, "expected a number, got #{what(v)}") unless v.match?(NUMBER_STRING)
              Float(v)
            else fail!(path, "expected a number, got #{what(v)}")
            end
        fail!(path, "number out of range for #{type}") if d.infinite? || (type == :float && d.abs >= FLOAT_LIMIT)
        d
      end

      def enum(f, v, path)
        case v
        when String
          number = f.enum_values[v.to_sym] if v.valid_encoding?
          return v.to_sym if number
          return SKIP if @ignore_unknown

          fail!(path, "#{v.inspect} is not a value of #{f.type_name} (values: #{f.enum_values.keys.join(', ')})")
        when Integer, Float then integer(:int32, v, path)
        else fail!(path, "expected an enum name or number, got #{what(v)}")
        end
      end

      def bytes(v, path)
        fail!(path, "expected a base64 string, got #{what(v)}") unless v.is_a?(String)

        body = v.end_with?("==") ? v[0...-2] : v.delete_suffix("=")
        padded = body.size != v.size
        bad = !body.match?(BASE64) || body.size % 4 == 1 || (padded && v.size % 4 != 0)
        fail!(path, "invalid base64 (#{v.size > 40 ? "#{v[0, 40].inspect}..." : v.inspect})") if bad

        body = body.tr("-_", "+/")
        body << ("=" * (-body.size % 4))
        body.unpack1("m")
      end

      def timestamp(v, path)
        fail!(path, "expected an RFC 3339 timestamp string, got #{what(v)}") unless v.is_a?(String)
        m = RFC3339.match(v) or fail!(path, "invalid timestamp #{v.inspect} (RFC 3339: 1972-01-01T10:00:20.021Z)")

        y, mo, d, h, mi, s = (1..6).map { |i| m[i].to_i }
        check_date(y, mo, d, h, mi, s, v, path)
        offset = m[8] ? 0 : (m[9] == "-" ? -1 : 1) * (m[10].to_i * 3600 + m[11].to_i * 60)
        fail!(path, "invalid offset in #{v.inspect}") if m[10].to_i > 23 || m[11].to_i > 59
        sec = Time.utc(y, mo, d, h, mi, s).to_i - offset
        fail!(path, "#{v.inspect} is outside years 1 to 9999 (UTC)") unless TIMESTAMP_SECONDS.cover?(sec)

        nsec = m[7] ? m[7].ljust(9, "0").to_i : 0
        Time.at(sec, nsec, :nsec)
      end

      def check_date(y, mo, d, h, mi, s, v, path)
        leap = (y % 4).zero? && (!(y % 100).zero? || (y % 400).zero?)
        days = mo == 2 && leap ? 29 : DAYS[mo]
        ok = y >= 1 && mo.between?(1, 12) && d.between?(1, days) && h <= 23 && mi <= 59 && s <= 59
        fail!(path, "invalid date or time in #{v.inspect}") unless ok
      end

      def what(v)
        case v
        when nil then "null"
        when Hash then "an object"
        when Array then "an array"
        when String then v.size > 40 ? "#{v[0, 40].inspect}..." : v.inspect
        else v.inspect
        end
      end

      def fail!(path, problem)
        where = path ? " at #{path}" : ""
        err = DecodeError.new("invalid JSON for #{@root.descriptor_name}#{where}: #{problem}")
        err.instance_variable_set(:@path, path)
        raise err
      end
    end
  end

  class Message
    # call-seq: Klass.encode_json(msg, options = {}) -> String
    #
    # The proto3 JSON of msg, as google-protobuf prints it. Options: emit_defaults: (print
    # fields at their default too), preserve_proto_fieldnames: (.proto names instead of
    # lowerCamelCase), format_enums_as_integers:.
    def self.encode_json(msg, options = {})
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
      state = args.first
      return ProtoJSON.encode(self, state || {}) if state.nil? || state.is_a?(Hash)

      text = ProtoJSON.encode(self)
      # JSON.generate's default (compact) state writes the text as it is; another layout
      # (pretty_generate) re-generates it from its parsed form.
      return text unless state.respond_to?(:indent) && !(state.indent.empty? && state.space.empty? && state.object_nl.empty?)

      ::JSON.parse(text).to_json(state)
    end
  end
end
