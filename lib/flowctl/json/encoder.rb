# frozen_string_literal: true

module Flowctl
  module ProtoJSON
    # Writes a message's proto3 JSON into a String, field by field from its descriptor.
    # A map or list filled in place with a value its field cannot hold raises TypeError,
    # ArgumentError or RangeError naming the field's path (`metrics["x"]`); the path is
    # put together only then (Problem), so printing builds no strings for it.
    class Encoder
      OPTIONS = %i[emit_defaults preserve_proto_fieldnames format_enums_as_integers].freeze

      def self.options(options)
        options = {} if options.nil?
        raise TypeError, "JSON options must be a Hash (given #{options.class})" unless options.is_a?(Hash)

        unknown = options.keys - OPTIONS
        raise ArgumentError, "unknown JSON option #{unknown.first.inspect} (options: #{OPTIONS.join(', ')})" if unknown.any?

        options
      end

      # The options as Flowctl::Native.json_encode's flags.
      def self.flags(opts)
        return 0 if opts.empty?

        (opts[:emit_defaults] ? 1 : 0) | (opts[:preserve_proto_fieldnames] ? 2 : 0) | (opts[:format_enums_as_integers] ? 4 : 0)
      end

      KEY_PACK = { int32: "l", sint32: "l", sfixed32: "l", uint32: "L", fixed32: "L",
                   int64: "q", sint64: "q", sfixed64: "q", uint64: "Q", fixed64: "Q" }.freeze

      def initialize(opts)
        @defaults = opts[:emit_defaults] ? true : false
        @proto_names = opts[:preserve_proto_fieldnames] ? true : false
        @enum_ints = opts[:format_enums_as_integers] ? true : false
      end

      # The whole text; the problem of a bad value is raised as its Ruby error with its path.
      def encode(msg)
        out = +""
        message(msg, msg.class.descriptor, out)
        out.force_encoding(Encoding::UTF_8)
      rescue Problem => e
        raise e.error_class, "#{e.path}: #{e.text}", cause: nil
      end

      private

      def message(msg, desc, out)
        kind = WELL_KNOWN[desc.name]
        return well_known(kind, msg, desc, out) if kind

        out << "{"
        first = true
        desc.fields.each do |f|
          v = msg[f.name]
          next unless present?(f, v)

          out << "," unless first
          first = false
          out << '"' << (@proto_names ? f.name.to_s : f.json_name) << '":'
          field(f, v, out)
        end
        out << "}"
      end

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

      def field(f, v, out)
        case f.label
        when :singular then value(f, v, out)
        when :repeated then list(f, v, out)
        else map(f, v, out)
        end
      rescue Problem => e
        raise e.at(f.name)
      end

      def list(f, v, out)
        out << "["
        v.each_with_index do |e, i|
          out << "," if i.positive?
          value(f, e, out)
        rescue Problem => err
          raise err.at("[#{i}]")
        end
        out << "]"
      end

      # In the order google-protobuf prints the map (ProtoJSON.upb_order).
      def map(f, v, out)
        entries = v.map do |k, e|
          key = map_key(f, k)
          [key_bytes(f, k, key), key, e]
        end
        out << "{"
        ProtoJSON.upb_order(entries).each_with_index do |(_, key, e), i|
          out << "," if i.positive?
          ProtoJSON.string(key, out)
          out << ":"
          begin
            value(f, e, out)
          rescue Problem => err
            raise err.at("[#{key.inspect}]")
          end
        end
        out << "}"
      end

      # What upb hashes of a key: a string's bytes, an integer at its C size, a bool's byte.
      def key_bytes(f, k, text)
        case f.key_type
        when :string then text.b
        when :bool then k ? "\x01".b : "\x00".b
        else [k].pack(KEY_PACK.fetch(f.key_type))
        end
      end

      def map_key(f, k)
        case f.key_type
        when :string then utf8(k)
        when :bool
          raise Problem.new(TypeError, "map key must be true or false (given #{k.class})") unless [true, false].include?(k)

          k.to_s
        else integer(f.key_type, k).to_s
        end
      rescue Problem => e
        raise e.at(" (a key #{k.inspect})")
      end

      def value(f, v, out)
        case f.type
        when :string then ProtoJSON.string(utf8(v), out)
        when :bytes
          raise Problem.new(TypeError, "expected a String for bytes (given #{v.class})") unless v.is_a?(String)

          out << '"' << [v].pack("m0") << '"'
        when :bool
          raise Problem.new(TypeError, "expected true or false (given #{v.class})") unless [true, false].include?(v)

          out << (v ? "true" : "false")
        when :double then out << ProtoJSON.double(number(v))
        when :float then out << ProtoJSON.float(number(v))
        when :enum then enum(f, v, out)
        when :message then submessage(f, v, out)
        else
          i = integer(f.type, v)
          QUOTED_INTS.include?(f.type) ? (out << '"' << i.to_s << '"') : (out << i.to_s)
        end
      end

      def submessage(f, v, out)
        if f.timestamp?
          out << '"' << timestamp(v) << '"'
        elsif f.message_class && v.is_a?(f.message_class)
          message(v, v.class.descriptor, out)
        else
          raise Problem.new(TypeError, "expected #{f.message_class || f.type_name} (given #{v.class})")
        end
      end

      def timestamp(t)
        raise Problem.new(TypeError, "expected a Time (given #{t.class})") unless t.is_a?(Time)

        ProtoJSON.timestamp(t) or
          raise Problem.new(RangeError, "#{t.inspect} is outside what google.protobuf.Timestamp holds (years 1 to 9999)")
      end

      def enum(f, v, out)
        number = v.is_a?(Integer) ? v : f.enum_values[v.is_a?(String) ? v.to_sym : v]
        raise Problem.new(ArgumentError, "#{v.inspect} is not a value of #{f.type_name}") if number.nil?

        integer(:int32, number)
        name = @enum_ints ? nil : f.enum_values.key(number)
        name ? (out << '"' << name.to_s << '"') : (out << number.to_s)
      end

      def utf8(v)
        raise Problem.new(TypeError, "expected a String (given #{v.class})") unless v.is_a?(String)
        return v if v.encoding == Encoding::UTF_8 && v.valid_encoding?

        s = [Encoding::BINARY, Encoding::US_ASCII].include?(v.encoding) ? v.dup.force_encoding(Encoding::UTF_8) : v.encode(Encoding::UTF_8)
        raise Problem.new(ArgumentError, "invalid UTF-8 in a string") unless s.valid_encoding?

        s
      rescue EncodingError => e
        raise Problem.new(ArgumentError, "cannot convert #{v.encoding} to UTF-8 (#{e.message})")
      end

      def integer(type, v)
        raise Problem.new(TypeError, "expected an Integer (given #{v.class})") unless v.is_a?(Integer)
        raise Problem.new(RangeError, "#{v} is out of range for #{type}") unless INT_RANGES[type].cover?(v)

        v
      end

      def number(v)
        return v if v.is_a?(Float)
        return v.to_f if v.is_a?(Integer)

        raise Problem.new(TypeError, "expected a Float (given #{v.class})")
      end
    end
  end
end
