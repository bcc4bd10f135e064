# frozen_string_literal: true

module Flowctl
  module Component
    # One `config` declaration of a component class:
    #
    #   config :batch_size, Integer, default: 100     # read from BATCH_SIZE
    #   config :network, String, required: true      # NETWORK must be set (or config: {network: ...})
    #
    # `flowctl run` passes a pipeline's `config:` keys as UPPER_SNAKE environment variables; a
    # value from the environment is a String and is converted to the declared type here.
    class ConfigField
      TYPES = [String, Integer, Float, :boolean, :duration, Array].freeze
      TRUE = %w[1 true yes on].freeze
      FALSE = %w[0 false no off].freeze
      NAME = /\A[a-z_][a-z0-9_]*\z/.freeze

      attr_reader :name, :type, :default, :env

      def initialize(name, type = String, default: nil, required: false, env: nil)
        @name = name.to_sym
        raise ArgumentError, "config name #{name.inspect} must be snake_case (#{NAME.source})" unless NAME.match?(@name.to_s)
        raise ArgumentError, "config #{@name}: type must be one of #{TYPES.inspect} (given #{type.inspect})" unless TYPES.include?(type)

        @type = type
        @default = default
        @required = required ? true : false
        @env = (env || @name.to_s.upcase).to_s.freeze
        freeze
      end

      def required? = @required

      # The value from explicit (a Hash with Symbol keys, wins), else the environment, else
      # the default. ArgumentError naming the variable for a missing or malformed value.
      def resolve(explicit, env)
        if explicit.key?(@name)
          value = explicit[@name]
          value.is_a?(String) ? convert(value, "config: #{@name}") : value
        elsif (raw = env[@env]) && !raw.empty?
          convert(raw, @env)
        elsif @required
          raise ArgumentError, "config #{@name} is required: set #{@env} (or pass config: {#{@name}: ...})"
        else
          @default
        end
      end

      private

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
