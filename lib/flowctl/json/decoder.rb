# frozen_string_literal: true

module Flowctl
  module ProtoJSON
    # Reads a parsed JSON document (Hashes, Arrays, Strings, numbers) into messages,
    # checking every value against its field. A problem becomes a Flowctl::DecodeError
    # naming the message class, the path of the field (`metrics["x"]`, `events[2].type`)
    # and what is wrong; the path is put together only then (Problem).
    class Decoder
      SKIP = Object.new.freeze # an unknown enum name when unknown names are ignored

      def initialize(klass, ignore_unknown)
        @root = klass
        @ignore_unknown = ignore_unknown ? true : false
      end

      def decode(tree)
        message(@root, tree)
      rescue Problem => e
        path = e.path
        err = DecodeError.new("invalid JSON for #{@root.descriptor_name}#{path ? " at #{path}" : ''}: #{e.text}")
        err.instance_variable_set(:@path, path)
        raise err, cause: nil
      end

      private

      def fail!(text) = raise(Problem.new(DecodeError, text))

      def message(klass, tree)
        kind = WELL_KNOWN[klass.descriptor_name]
        return well_known(kind, klass, tree) if kind

        fail!("expected an object for #{klass.descriptor_name}, got #{what(tree)}") unless tree.is_a?(Hash)

        desc = klass.descriptor
        twice(desc, tree)
        msg = klass.new
        seen = {} # field => the key it was given by; oneof number => the key of its member
        tree.each do |key, v|
          f = desc.field(key) or next(unknown(klass, key))
          begin
            once(seen, f, key)
            next if v.nil? && f.type_name != VALUE_TYPE # null: the default, but a Value holds it

            oneof_once(seen, f, key) if f.oneof
            v = field(f, v)
            set(msg, f, v) unless v.equal?(SKIP)
          rescue Problem => e
            raise e.at(f.name)
          end
        end
        msg
      end

      # A key given twice in the object of a message (JSON.parse kept the last value).
      def twice(desc, tree)
        key = tree.respond_to?(:twice) && tree.twice&.first or return
        f = desc.field(key)
        return if f.nil? && @ignore_unknown

        problem = Problem.new(DecodeError, "field given twice (#{key.inspect})")
        raise f ? problem.at(f.name) : problem
      end

      def unknown(klass, key)
        return if @ignore_unknown

        fail!("unknown field #{key.inspect} for #{klass.descriptor_name} " \
              "(fields: #{klass.descriptor.fields.map(&:json_name).join(', ')})")
      end

      # A field by both its names is given twice.
      def once(seen, f, key)
        fail!("field given twice (#{seen[f].inspect} and #{key.inspect})") if seen.key?(f)
        seen[f] = key
      end

      # At most one member of a oneof (null aside), as upb reads it.
      def oneof_once(seen, f, key)
        other = seen[f.oneof]
        fail!("#{other.inspect} and #{key.inspect} are members of one oneof: give one of them") if other
        seen[f.oneof] = key
      end

      def set(msg, f, v)
        msg[f.name] = v
      rescue TypeError, ArgumentError, RangeError => e
        fail!(e.message)
      end

      def field(f, v)
        case f.label
        when :singular then value(f, v)
        when :repeated then list(f, v)
        else map(f, v)
        end
      end

      def list(f, v)
        fail!("expected an array, got #{what(v)}") unless v.is_a?(Array)

        out = []
        v.each_with_index do |e, i|
          e = element(f, e)
          out << e unless e.equal?(SKIP)
        rescue Problem => err
          raise err.at("[#{i}]")
        end
        out
      end

      def map(f, v)
        fail!("expected an object, got #{what(v)}") unless v.is_a?(Hash)
        fail!("map key #{v.twice.first.inspect} given twice") if v.respond_to?(:twice) && v.twice

        out = {}
        v.each do |k, e|
          e = element(f, e)
          out[key(f, k)] = e unless e.equal?(SKIP)
        rescue Problem => err
          raise err.at("[#{k.inspect}]")
        end
        out
      end

      def key(f, k)
        fail!("invalid UTF-8 in a map key") unless k.valid_encoding?

        case f.key_type
        when :string then k
        when :bool
          fail!("map key must be \"true\" or \"false\"") unless %w[true false].include?(k)
          k == "true"
        else
          fail!("map key must be an integer") unless k.match?(INT_STRING)
          range(f.key_type, Integer(k, 10))
        end
      end

      def element(f, v)
        fail!("null is not allowed in a #{f.label == :map ? 'map' : 'list'}") if v.nil? && f.type_name != VALUE_TYPE

        value(f, v)
      end

      def value(f, v)
        fail!("invalid UTF-8 in a string") if v.is_a?(String) && !v.valid_encoding?

        case f.type
        when :string
          fail!("expected a string, got #{what(v)}") unless v.is_a?(String)
          v
        when :bytes then bytes(v)
        when :bool
          fail!("expected true or false, got #{what(v)}") unless v == true || v == false
          v
        when :double, :float then float(f.type, v)
        when :enum then enum(f, v)
        when :message
          if f.timestamp? then timestamp(v)
          elsif f.message_class then message(f.message_class, v)
          else fail!("no message class for #{f.type_name}")
          end
        else integer(f.type, v)
        end
      end

      def integer(type, v)
        n = case v
            when Integer then v
            when Float
              fail!("#{v} is not an integer") unless v.finite? && v == v.floor
              v.to_i
            when String
              if v.match?(INT_STRING) then Integer(v, 10)
              elsif v.match?(NUMBER_STRING) then integer(type, Float(v))
              else fail!("expected an integer, got #{what(v)}")
              end
            else fail!("expected an integer, got #{what(v)}")
            end
        range(type, n)
      end

      def range(type, n)
        fail!("#{n} is out of range for #{type}") unless INT_RANGES[type].cover?(n)
        n
      end

      def float(type, v)
        d = case v
            when Integer, Float then v.to_f
            when "NaN" then return Float::NAN
            when "Infinity" then return Float::INFINITY
            when "-Infinity" then return -Float::INFINITY
            when String
              fail!("expected a number, got #{what(v)}") unless v.match?(NUMBER_STRING)
              Float(v)
            else fail!("expected a number, got #{what(v)}")
            end
        fail!("number out of range for #{type}") if d.infinite? || (type == :float && d.abs >= FLOAT_LIMIT)
        d
      end

      def enum(f, v)
        case v
        when String
          return v.to_sym if f.enum_values.key?(v.to_sym)
          return SKIP if @ignore_unknown

          fail!("#{v.inspect} is not a value of #{f.type_name} (values: #{f.enum_values.keys.join(', ')})")
        when Integer, Float then integer(:int32, v)
        else fail!("expected an enum name or number, got #{what(v)}")
        end
      end

      def bytes(v)
        fail!("expected a base64 string, got #{what(v)}") unless v.is_a?(String)

        body = v.end_with?("==") ? v[0...-2] : v.delete_suffix("=")
        padded = body.size != v.size
        bad = !body.match?(BASE64) || body.size % 4 == 1 || (padded && v.size % 4 != 0)
        fail!("invalid base64 (#{what(v)})") if bad

        body = body.tr("-_", "+/")
        body << ("=" * (-body.size % 4))
        body.unpack1("m")
      end

      # RFC 3339 read by byte positions once the pattern has matched (no MatchData, no
      # Time but the result: a message with many Timestamps reads fast).
      def timestamp(v)
        fail!("expected an RFC 3339 timestamp string, got #{what(v)}") unless v.is_a?(String)
        fail!("invalid timestamp #{what(v)} (RFC 3339: 1972-01-01T10:00:20.021Z)") unless RFC3339.match?(v)

        y, mo, d, h, mi, s = [[0, 4], [5, 2], [8, 2], [11, 2], [14, 2], [17, 2]].map { |pos, len| digits(v, pos, len) }
        check_date(y, mo, d, h, mi, s, v)
        pos, nsec = fraction(v)
        sec = (days_from_civil(y, mo, d) * 86_400) + (h * 3600) + (mi * 60) + s - offset(v, pos)
        fail!("#{v.inspect} is outside years 1 to 9999 (UTC)") unless TIMESTAMP_SECONDS.cover?(sec)

        Time.at(sec, nsec, :nsec)
      end

      def digits(v, pos, len)
        n = 0
        len.times { |i| n = (n * 10) + v.getbyte(pos + i) - 48 }
        n
      end

      # [position after the fraction, nanoseconds]
      def fraction(v)
        return [19, 0] unless v.getbyte(19) == 46 # "."

        pos = 20
        nsec = 0
        scale = 100_000_000
        while (c = v.getbyte(pos)) && c >= 48 && c <= 57
          nsec += (c - 48) * scale
          scale /= 10
          pos += 1
        end
        [pos, nsec]
      end

      # Seconds east of UTC of "Z" or "+hh:mm" / "-hh:mm" at pos.
      def offset(v, pos)
        return 0 if v.getbyte(pos) == 90 # "Z"

        oh = digits(v, pos + 1, 2)
        om = digits(v, pos + 4, 2)
        fail!("invalid offset in #{v.inspect}") if oh > 23 || om > 59
        ((oh * 3600) + (om * 60)) * (v.getbyte(pos) == 45 ? -1 : 1)
      end

      # Days since 1970-01-01 of a proleptic Gregorian date (y >= 1).
      def days_from_civil(y, m, d)
        y -= 1 if m <= 2
        era = y / 400
        yoe = y - (era * 400)
        doy = ((153 * (m + (m > 2 ? -3 : 9))) + 2) / 5 + d - 1
        doe = (yoe * 365) + (yoe / 4) - (yoe / 100) + doy
        (era * 146_097) + doe - 719_468
      end

      def check_date(y, mo, d, h, mi, s, v)
        leap = (y % 4).zero? && (!(y % 100).zero? || (y % 400).zero?)
        days = mo == 2 && leap ? 29 : DAYS[mo]
        ok = y >= 1 && mo.between?(1, 12) && d.between?(1, days) && h <= 23 && mi <= 59 && s <= 59
        fail!("invalid date or time in #{v.inspect}") unless ok
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
    end
  end
end
