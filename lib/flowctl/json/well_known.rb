# frozen_string_literal: true

module Flowctl
  module ProtoJSON
    # The well-known types with a JSON form of their own (google.protobuf.Timestamp is a
    # Time and handled where fields are; Empty is the plain {}): Duration ("1.5s"), the
    # wrappers (their value), FieldMask ("a.b,cD"), Struct/Value/ListValue (any JSON) and
    # Any ({"@type": ..., fields}). They apply wherever such a message is, at the top too.
    WRAPPERS = %w[DoubleValue FloatValue Int64Value UInt64Value Int32Value UInt32Value BoolValue StringValue BytesValue]
               .to_h { |n| ["google.protobuf.#{n}", :wrapper] }
    WELL_KNOWN = {
      "google.protobuf.Duration" => :duration, "google.protobuf.FieldMask" => :field_mask,
      "google.protobuf.Struct" => :struct, "google.protobuf.Value" => :value, "google.protobuf.ListValue" => :list_value,
      "google.protobuf.Any" => :any
    }.merge(WRAPPERS).freeze
    VALUE_TYPE = "google.protobuf.Value"
    DURATION_SECONDS = 315_576_000_000 # 10000 years
    DURATION = /\A(-)?([0-9]+)(?:\.([0-9]{1,9}))?s\z/

    TYPE_URL = %r{\A[^/]+/(?:.*/)?([^/]+)\z} # "type.googleapis.com/x.Y", as upb takes it

    # The class of an Any's type URL, or nil (no host, or a type not loaded).
    def self.class_of_url(url)
      name = TYPE_URL.match(url)&.[](1) or return nil
      Native.message_class(name)
    rescue ArgumentError
      nil
    end

    class Encoder
      private

      def well_known(kind, msg, desc, out)
        send(:"wk_#{kind}", msg, desc, out)
      end

      def wk_wrapper(msg, desc, out)
        value(desc.field(:value), msg[:value], out)
      end

      def wk_duration(msg, _desc, out)
        sec = msg[:seconds]
        ns = msg[:nanos]
        bad = sec.abs > DURATION_SECONDS || ns.abs >= 1_000_000_000 || (sec.positive? && ns.negative?) || (sec.negative? && ns.positive?)
        raise Problem.new(RangeError, "invalid google.protobuf.Duration (seconds #{sec}, nanos #{ns})") if bad

        out << '"' << (sec.zero? && ns.negative? ? "-" : "") << sec.to_s
        out << ProtoJSON.fraction(ns.abs) << 's"'
      end

      def wk_field_mask(msg, _desc, out)
        paths = msg[:paths].map do |p|
          raise Problem.new(ArgumentError, "FieldMask path #{p.inspect} cannot be written in JSON") if p.match?(/[A-Z]|_(?![a-z])/)

          p.gsub(/_([a-z])/) { Regexp.last_match(1).upcase }
        end
        ProtoJSON.string(paths.join(","), out)
      end

      def wk_struct(msg, desc, out)
        map(desc.field(:fields), msg[:fields], out)
      end

      def wk_list_value(msg, desc, out)
        list(desc.field(:values), msg[:values], out)
      end

      def wk_value(msg, desc, out)
        f = desc.fields.find { |x| !msg[x.name].nil? }
        raise Problem.new(ArgumentError, "google.protobuf.Value has no kind set") if f.nil?
        return out << "null" if f.name == :null_value

        v = msg[f.name]
        raise Problem.new(ArgumentError, "google.protobuf.Value cannot hold #{v}") if v.is_a?(Float) && !v.finite?

        value(f, v, out)
      end

      def wk_any(msg, _desc, out)
        url = msg[:type_url]
        raise Problem.new(ArgumentError, "google.protobuf.Any without a type_url has no JSON") if url.empty?

        klass = ProtoJSON.class_of_url(url)
        raise Problem.new(ArgumentError, "google.protobuf.Any holds #{url.inspect}: no host/ or a type not loaded") unless klass

        inner = klass.decode(msg[:value])
        text = +""
        message(inner, klass.descriptor, text)
        out << '{"@type":'
        ProtoJSON.string(url, out)
        if WELL_KNOWN.key?(klass.descriptor_name)
          out << ',"value":' << text << "}"
        else
          out << (text == "{}" ? "}" : ",#{text[1..]}")
        end
      rescue DecodeError => e
        raise Problem.new(ArgumentError, "google.protobuf.Any: #{e.message}")
      end
    end

    class Decoder
      private

      # (what a setter refuses is a DecodeError too, as for plain fields)
      def well_known(kind, klass, tree)
        fail!("invalid UTF-8 in a string") if tree.is_a?(String) && !tree.valid_encoding?

        send(:"wk_#{kind}", klass, tree)
      rescue TypeError, ArgumentError, RangeError => e
        fail!(e.message)
      end

      def wk_wrapper(klass, tree)
        f = klass.descriptor.field(:value)
        klass.new(value: value(f, tree))
      end

      def wk_duration(klass, tree)
        fail!("expected a duration string like \"1.5s\", got #{what(tree)}") unless tree.is_a?(String)
        m = DURATION.match(tree) or fail!("invalid duration #{what(tree)} (like \"-1.5s\")")

        sec = m[2].to_i
        ns = m[3] ? m[3].ljust(9, "0").to_i : 0
        fail!("duration #{tree.inspect} is out of range (10000 years)") if sec > DURATION_SECONDS
        m[1] ? klass.new(seconds: -sec, nanos: -ns) : klass.new(seconds: sec, nanos: ns)
      end

      def wk_field_mask(klass, tree)
        fail!("expected a FieldMask string like \"a.b,cD\", got #{what(tree)}") unless tree.is_a?(String)

        paths = tree.empty? ? [] : tree.split(",", -1)
        paths.each { |p| fail!("invalid FieldMask path #{p.inspect}") unless p.match?(/\A[A-Za-z0-9.]+\z/) }
        klass.new(paths: paths.map { |p| p.gsub(/[A-Z]/) { |c| "_#{c.downcase}" } })
      end

      def wk_struct(klass, tree)
        fail!("expected an object for google.protobuf.Struct, got #{what(tree)}") unless tree.is_a?(Hash)

        klass.new(fields: map(klass.descriptor.field(:fields), tree))
      end

      def wk_list_value(klass, tree)
        fail!("expected an array for google.protobuf.ListValue, got #{what(tree)}") unless tree.is_a?(Array)

        klass.new(values: list(klass.descriptor.field(:values), tree))
      end

      def wk_value(klass, tree)
        desc = klass.descriptor
        case tree
        when nil then klass.new(null_value: 0)
        when true, false then klass.new(bool_value: tree)
        when Numeric then klass.new(number_value: float(:double, tree))
        when String then klass.new(string_value: tree)
        when Hash then klass.new(struct_value: message(desc.field(:struct_value).message_class, tree))
        else klass.new(list_value: message(desc.field(:list_value).message_class, tree))
        end
      end

      def wk_any(klass, tree)
        fail!("expected an object for google.protobuf.Any, got #{what(tree)}") unless tree.is_a?(Hash)

        fail!("key #{tree.twice.first.inspect} given twice") if tree.respond_to?(:twice) && tree.twice
        url = tree["@type"]
        fail!("google.protobuf.Any needs a string \"@type\"") unless url.is_a?(String)
        inner = ProtoJSON.class_of_url(url) or
          fail!("\"@type\" #{url.inspect} is not host/name of a loaded type (type.googleapis.com/x.Y)")

        rest = tree.reject { |k, _| k == "@type" }
        msg = if WELL_KNOWN.key?(inner.descriptor_name)
                fail!("an Any of #{inner.descriptor_name} takes \"value\"") unless rest.keys == ["value"]
                message(inner, rest["value"])
              else
                message(inner, rest)
              end
        klass.new(type_url: url, value: msg.to_proto)
      end
    end
  end
end
