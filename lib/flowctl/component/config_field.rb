# frozen_string_literal: true

module Flowctl
  module Component
    # One `config` declaration of a component class:
    #
    #   config :batch_size, Integer, default: 100, min: 1, max: 10_000  # read from BATCH_SIZE
    #   config :network, String, required: true, allowed: %w[testnet mainnet]
    #
    # `flowctl run` passes a pipeline's `config:` keys as UPPER_SNAKE environment variables; a
    # value from the environment is a String and is converted to the declared type here.
    # min/max (Integer, Float and :duration keys) and allowed: are checked at start and on
    # every live update (LiveConfig); the declarations are also the schema the component
    # declares to the control plane (#schema_entry).
    class ConfigField
      TYPES = [String, Integer, Float, :boolean, :duration, Array].freeze
      TRUE = %w[1 true yes on].freeze
      FALSE = %w[0 false no off].freeze
      NAME = /\A[a-z_][a-z0-9_]*\z/.freeze
      NUMERIC = [Integer, Float, :duration].freeze
      # The live configuration schema's type of each declared type (Array keys are not live).
      SCHEMA_TYPES = { String => "string", Integer => "integer", Float => "number", :boolean => "boolean",
                       :duration => "number" }.freeze

      attr_reader :name, :type, :default, :env, :min, :max, :allowed, :description

      def initialize(name, type = String, default: nil, required: false, env: nil, min: nil, max: nil, allowed: nil,
                     description: "")
        @name = name.to_sym
        raise ArgumentError, "config name #{name.inspect} must be snake_case (#{NAME.source})" unless NAME.match?(@name.to_s)
        raise ArgumentError, "config #{@name}: type must be one of #{TYPES.inspect} (given #{type.inspect})" unless TYPES.include?(type)

        @type = type
        @required = required ? true : false
        @env = (env || @name.to_s.upcase).to_s.freeze
        @min = bound(:min, min)
        @max = bound(:max, max)
        @allowed = allowed.nil? ? nil : Array(allowed).freeze
        @description = description.to_s.dup.freeze
        @default = default.nil? ? nil : check(default, "config #{@name} default")
        freeze
      end

      def required? = @required

      # Whether live updates can change it (every type but Array).
      def live? = SCHEMA_TYPES.key?(@type)

      # The value from explicit (a Hash with Symbol keys, wins), else the environment, else
      # the default. ArgumentError naming the variable for a missing, malformed or
      # out-of-range value.
      def resolve(explicit, env)
        if explicit.key?(@name)
          value = explicit[@name]
          check(value.is_a?(String) ? convert(value, "config: #{@name}") : value, "config: #{@name}")
        elsif (raw = env[@env]) && !raw.empty?
          check(convert(raw, @env), @env)
        elsif @required
          raise ArgumentError, "config #{@name} is required: set #{@env} (or pass config: {#{@name}: ...})"
        else
          @default
        end
      end

      # A value of a live update, as JSON decoded it -> the declared type (an Integer for a
      # Float key becomes a Float). ArgumentError naming the key when it does not fit.
      def coerce(value)
        value = value.to_f if (@type == Float || @type == :duration) && value.is_a?(Integer)
        check(value, "config key #{@name.to_s.inspect}")
      end

      # This key in Flowctl::Config::Schema's terms, with `current` as its default (so that
      # version 1 in the control plane is what the component runs with).
      def schema_entry(current)
        { type: SCHEMA_TYPES.fetch(@type), required: @required, min: @min, max: @max, allowed: @allowed,
          default: current, description: @description }.compact
      end

      private

      def bound(key, value)
        return nil if value.nil?
        raise ArgumentError, "config #{@name}: #{key}: applies to Integer, Float and :duration keys only" unless NUMERIC.include?(@type)
        raise ArgumentError, "config #{@name}: #{key}: must be a number (given #{value.inspect})" unless value.is_a?(Numeric)

        value
      end

      # The value, once it has the declared type and fits min, max and allowed.
      def check(value, source)
        unless type_ok?(value)
          raise ArgumentError, "#{source}: #{value.inspect} is not #{@type.is_a?(Symbol) ? "a #{@type}" : "a #{@type.name}"}"
        end
        raise ArgumentError, "#{source}: #{value.inspect} is below the minimum #{@min}" if @min && value < @min
        raise ArgumentError, "#{source}: #{value.inspect} is above the maximum #{@max}" if @max && value > @max
        if @allowed && !@allowed.include?(value)
          raise ArgumentError, "#{source}: #{value.inspect} is not one of #{@allowed.map(&:inspect).join(', ')}"
        end

        value
      end

      def type_ok?(value)
        case @type
        when :boolean then [true, false].include?(value)
        when :duration then value.is_a?(Numeric) && value.positive?
        when Float then value.is_a?(Numeric)
        else value.is_a?(@type)
        end
      end

      def convert(text, source)
        if @type == String then text
        elsif @type == Integer then Integer(text.strip, 10)
        elsif @type == Float then Float(text.strip)
        elsif @type == Array then text.split(",").map(&:strip).reject(&:empty?)
        elsif @type == :duration then Duration.parse(text, name: source)
        else boolean(text, source)
        end
      rescue ArgumentError => e
        raise if e.message.start_with?(source)

        raise ArgumentError, "#{source}: #{text.inspect} is not a valid #{@type.is_a?(Symbol) ? @type : @type.name}"
      end

      def boolean(text, source)
        v = text.strip.downcase
        return true if TRUE.include?(v)
        return false if FALSE.include?(v)

        raise ArgumentError, "#{source}: #{text.inspect} is not a boolean (true/false, 1/0, yes/no, on/off)"
      end
    end
  end
end
